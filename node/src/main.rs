//! The `shoal` binary: parses the command line and calls into the library.

use std::io::BufRead;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use shoal_node::config::Config;
use shoal_node::server::{self, Listeners};
use shoal_node::{storage, tls};

#[derive(Parser)]
#[command(name = "shoal", version, about = "Shoal XMPP server")]
struct Cli {
    /// Configuration file (TOML). Every key is optional; SHOAL_* variables override it.
    #[arg(long, short, env = "SHOAL_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (the default).
    Serve,
    /// Manage accounts in the configured storage (run while the node is stopped when
    /// using the embedded store, which a running node holds locked).
    User {
        #[command(subcommand)]
        action: UserAction,
    },
    /// Certificate helpers.
    Cert {
        #[command(subcommand)]
        action: CertAction,
    },
}

#[derive(Subcommand)]
enum UserAction {
    /// Create an account. The password is read from the first line of stdin unless
    /// --password is given.
    Add {
        user: String,
        #[arg(long)]
        password: Option<String>,
    },
    /// Change an account's password (read like `add`).
    Passwd {
        user: String,
        #[arg(long)]
        password: Option<String>,
    },
    /// Delete an account.
    Del { user: String },
    /// List accounts.
    List,
}

#[derive(Subcommand)]
enum CertAction {
    /// Write a self-signed certificate for the configured domain to the configured
    /// tls.cert / tls.key paths (overwriting them).
    Generate,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let env = std::env::vars().filter(|(k, _)| k != "SHOAL_CONFIG");
    let config = match Config::load(cli.config.as_deref(), env) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("configuration errors:\n{errors}");
            std::process::exit(2);
        }
    };
    init_logging();
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(config),
        Command::User { action } => user(config, action),
        Command::Cert {
            action: CertAction::Generate,
        } => {
            tls::generate_self_signed(&config.domain, &config.tls.cert, &config.tls.key)?;
            println!(
                "wrote {} and {}",
                config.tls.cert.display(),
                config.tls.key.display()
            );
            Ok(())
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SHOAL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).init();
}

fn serve(config: Config) -> anyhow::Result<()> {
    let listeners = Listeners::bind(&config)?;
    actix_rt::System::new().block_on(server::run(config, listeners, shutdown_signal()))
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

fn user(config: Config, action: UserAction) -> anyhow::Result<()> {
    let store = storage::open(&config.storage).context("cannot open storage")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let accounts = store.accounts;
    let jid = |u: &str| -> anyhow::Result<String> {
        let full = if u.contains('@') {
            u.to_string()
        } else {
            format!("{u}@{}", config.domain)
        };
        let bare = jid::BareJid::new(&full).with_context(|| format!("invalid user {u:?}"))?;
        if bare.domain().as_str() != config.domain || bare.node().is_none() {
            bail!("{u:?} is not an account on {}", config.domain);
        }
        Ok(bare.to_string())
    };
    rt.block_on(async {
        match action {
            UserAction::Add { user, password } => {
                let user = jid(&user)?;
                let creds = storage::new_credentials(&password_or_stdin(password)?);
                accounts.create_account(&user, &creds).await?;
                println!("created {user}");
            }
            UserAction::Passwd { user, password } => {
                let user = jid(&user)?;
                let creds = storage::new_credentials(&password_or_stdin(password)?);
                accounts.set_credentials(&user, &creds).await?;
                println!("password changed for {user}");
            }
            UserAction::Del { user } => {
                let user = jid(&user)?;
                if !accounts.delete_account(&user).await? {
                    bail!("no such account: {user}");
                }
                println!("deleted {user}");
            }
            UserAction::List => {
                for u in accounts.list_accounts().await? {
                    println!("{u}");
                }
            }
        }
        Ok(())
    })
}

fn password_or_stdin(given: Option<String>) -> anyhow::Result<String> {
    let password = match given {
        Some(p) => p,
        None => {
            let mut line = String::new();
            std::io::stdin().lock().read_line(&mut line)?;
            line.trim_end_matches(['\r', '\n']).to_string()
        }
    };
    if password.is_empty() {
        bail!("empty password");
    }
    Ok(password)
}
