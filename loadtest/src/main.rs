//! `shoal-load`: the load generator. Its scenarios are built by the load-test issue;
//! until then the binary only says so, so nobody mistakes it for a working harness.

fn main() {
    eprintln!("shoal-load: no scenarios yet (they arrive with the load-test harness work)");
    std::process::exit(2);
}
