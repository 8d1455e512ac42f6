//! Compiles `shoal/cluster/v1/cluster.proto` with protox, a protobuf compiler written in
//! Rust, so building needs no system `protoc` (DESIGN.md "Workspace"). The parsed
//! descriptors go to tonic-prost-build, which writes the prost messages and the tonic
//! client and server into `OUT_DIR`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "shoal/cluster/v1/cluster.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["."])?;
    tonic_prost_build::configure()
        // Stanza payloads and shard state are `bytes::Bytes`: decoding slices the
        // receive buffer instead of copying, and the router passes them on as they are.
        .bytes(".shoal.cluster.v1")
        .compile_fds(descriptors)?;
    Ok(())
}
