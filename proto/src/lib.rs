//! The node-to-node contract. The cluster work fills this with the gRPC service; until then the crate is an empty placeholder so the workspace layout is fixed.
