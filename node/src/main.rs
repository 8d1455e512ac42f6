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
    /// Create many accounts in one go: from FILE (`user:password` per line, `-` for
    /// stdin; blank lines and lines starting with `#` are skipped), or PREFIX0 ..
    /// PREFIX{N-1} with --count. Existing accounts are left alone and counted as
    /// skipped. Key derivation runs on all cores.
    Import {
        #[arg(required_unless_present = "count", conflicts_with = "count")]
        file: Option<PathBuf>,
        /// Generate this many accounts instead of reading a file.
        #[arg(long, requires = "password")]
        count: Option<usize>,
        /// Name prefix for --count.
        #[arg(long, default_value = "user")]
        prefix: String,
        /// The password of every generated account (with --count).
        #[arg(long)]
        password: Option<String>,
        /// Threads deriving keys (default: available cores).
        #[arg(long)]
        threads: Option<usize>,
    },
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
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Opened inside the runtime: the Redis backend's connection runs on it.
    let store = rt
        .block_on(storage::open(&config.storage))
        .context("cannot open storage")?;
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
            UserAction::Import {
                file,
                count,
                prefix,
                password,
                threads,
            } => {
                let wanted = match (file, count) {
                    (Some(file), _) => read_import_file(&file)?,
                    (None, Some(n)) => {
                        let password = password.context("--count needs --password")?;
                        (0..n)
                            .map(|i| (format!("{prefix}{i}"), password.clone()))
                            .collect()
                    }
                    (None, None) => bail!("give a FILE or --count"),
                };
                let mut bad = Vec::new();
                let mut entries = Vec::with_capacity(wanted.len());
                for (user, password) in wanted {
                    match jid(&user) {
                        Ok(j) if !password.is_empty() => entries.push((j, password)),
                        Ok(_) => bad.push(format!("{user}: empty password")),
                        Err(e) => bad.push(format!("{e:#}")),
                    }
                }
                if !bad.is_empty() {
                    bail!("nothing imported; invalid entries:\n  {}", bad.join("\n  "));
                }
                let started = std::time::Instant::now();
                let existing: std::collections::HashSet<String> =
                    accounts.list_accounts().await?.into_iter().collect();
                let before = entries.len();
                entries.retain(|(j, _)| !existing.contains(j));
                // Duplicates within the input would race each other to create.
                let mut seen = std::collections::HashSet::new();
                entries.retain(|(j, _)| seen.insert(j.clone()));
                let mut skipped = before - entries.len();
                let threads = threads
                    .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
                    .unwrap_or(1)
                    .max(1);
                let derived = derive_all(&entries, threads);
                let derive_secs = started.elapsed().as_secs_f64();
                let mut created = 0usize;
                for ((user, _), creds) in entries.iter().zip(&derived) {
                    match accounts.create_account(user, creds).await {
                        Ok(()) => created += 1,
                        Err(storage::StorageError::AlreadyExists) => skipped += 1,
                        Err(e) => return Err(e).with_context(|| format!("create {user}")),
                    }
                }
                println!(
                    "created {created}, skipped {skipped} (already existed) in {:.2} s \
                     (key derivation {derive_secs:.2} s on {threads} threads)",
                    started.elapsed().as_secs_f64()
                );
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

/// Reads `user:password` lines (the password is everything after the first `:`).
fn read_import_file(path: &std::path::Path) -> anyhow::Result<Vec<(String, String)>> {
    let text = if path.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())?
    } else {
        std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?
    };
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let (user, password) = line
            .split_once(':')
            .with_context(|| format!("line {}: expected user:password", n + 1))?;
        out.push((user.trim().to_string(), password.to_string()));
    }
    Ok(out)
}

/// Derives SCRAM credentials for every entry, in order, on `threads` threads. PBKDF2 is
/// the whole cost of an import, and each derivation is independent.
fn derive_all(
    entries: &[(String, String)],
    threads: usize,
) -> Vec<shoal_xmpp::sasl::StoredCredentials> {
    if entries.is_empty() {
        return Vec::new();
    }
    let chunk = entries.len().div_ceil(threads);
    std::thread::scope(|s| {
        let workers: Vec<_> = entries
            .chunks(chunk)
            .map(|part| {
                s.spawn(move || {
                    part.iter()
                        .map(|(_, password)| storage::new_credentials(password))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("key derivation panicked"))
            .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn import_file_format() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.txt");
        std::fs::write(&path, "# accounts\nalice:pw1\n\nbob:p:w\r\n").unwrap();
        assert_eq!(
            read_import_file(&path).unwrap(),
            vec![
                ("alice".to_string(), "pw1".to_string()),
                ("bob".to_string(), "p:w".to_string())
            ]
        );
        std::fs::write(&path, "alice:pw1\ncarol\n").unwrap();
        let err = read_import_file(&path).unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
    }

    /// `shoal user …` against the Redis backend: every action, checked through a store
    /// of its own.
    #[test]
    fn user_commands_work_on_redis() {
        let server = shoal_node::testing::RedisServer::start();
        let config = Config::load(
            None,
            [
                ("SHOAL_STORAGE_BACKEND", "redis".to_owned()),
                ("SHOAL_STORAGE_REDIS_URL", server.url()),
            ]
            .map(|(k, v)| (k.to_owned(), v)),
        )
        .unwrap();
        let run = |action| user(config.clone(), action);
        let password = |p: &str| Some(p.to_owned());
        run(UserAction::Add {
            user: "alice".into(),
            password: password("pw1"),
        })
        .unwrap();
        let err = run(UserAction::Add {
            user: "alice".into(),
            password: password("pw1"),
        })
        .unwrap_err();
        assert!(err.to_string().contains("already exists"), "{err:#}");
        run(UserAction::Passwd {
            user: "alice@localhost".into(),
            password: password("pw2"),
        })
        .unwrap();
        run(UserAction::Import {
            file: None,
            count: Some(3),
            prefix: "u".into(),
            password: password("x"),
            threads: Some(2),
        })
        .unwrap();
        run(UserAction::List).unwrap();
        run(UserAction::Del { user: "u1".into() }).unwrap();
        assert!(run(UserAction::Del { user: "u1".into() }).is_err());

        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let store = storage::open(&config.storage).await.unwrap();
            let accounts = store.accounts.list_accounts().await.unwrap();
            assert_eq!(
                accounts,
                ["alice@localhost", "u0@localhost", "u2@localhost"]
            );
            let alice = store.accounts.credentials("alice@localhost").await;
            assert!(alice.unwrap().unwrap().verify_password("pw2"));
        });
    }

    #[test]
    fn derivation_keeps_input_order() {
        let entries: Vec<_> = (0..5)
            .map(|i| (format!("u{i}"), format!("pw{i}")))
            .collect();
        let derived = derive_all(&entries, 3);
        assert_eq!(derived.len(), 5);
        for ((_, pw), creds) in entries.iter().zip(&derived) {
            let again = shoal_xmpp::sasl::StoredCredentials::derive(
                pw,
                &creds.sha1.salt,
                &creds.sha256.salt,
                creds.sha256.iterations,
            );
            assert_eq!(&again, creds);
        }
        assert!(derive_all(&[], 4).is_empty());
    }
}
