//! `shoal-load`: the load generator. Filled in by the load-test issue.
fn main() {}
