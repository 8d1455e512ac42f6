//! `shoal-load`: parses the command line, runs the scenario on a multi-threaded tokio
//! runtime, prints the summary and writes the JSON report.

use anyhow::Context;
use clap::Parser;
use shoal_loadtest::cli::Cli;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = cli.scenario.common().threads {
        rt.worker_threads(n.max(1));
    }
    let rt = rt.enable_all().build()?;
    let json = cli.scenario.common().json.clone();
    let report = rt.block_on(shoal_loadtest::run(cli.scenario))?;
    print!("{}", report.human());
    if let Some(path) = json {
        let file =
            std::fs::File::create(&path).with_context(|| format!("create {}", path.display()))?;
        serde_json::to_writer_pretty(std::io::BufWriter::new(file), &report)
            .with_context(|| format!("write {}", path.display()))?;
    }
    // Sessions still closing in the background must not hold the process open.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    Ok(())
}
