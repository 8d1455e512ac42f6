//! A third-party server a test runs (HAProxy, Prosody): in the foreground, in a
//! temporary directory of its own, with its output in `output.log` there. It is killed
//! when dropped, and a test that fails while one runs prints the end of its logs.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How many of a program's last log lines a failing test prints.
const TAIL: usize = 200;

pub struct Program {
    name: &'static str,
    dir: TempDir,
    child: Child,
    /// Log files it writes itself in `dir`, besides `output.log`.
    logs: Vec<&'static str>,
}

impl Program {
    /// Runs `command` (named `name` in messages) in `dir`; `logs` are the files in `dir`
    /// it writes its log to, if any besides its output.
    pub fn spawn(
        name: &'static str,
        mut command: Command,
        dir: TempDir,
        logs: &[&'static str],
    ) -> Program {
        let output = std::fs::File::create(dir.path().join("output.log")).expect("the output log");
        let child = command
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(output.try_clone().expect("the output log"))
            .stderr(output)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run {name} ({e}): run `bash scripts/test-deps.sh` to install it")
            });
        Program {
            name,
            dir,
            child,
            logs: logs.to_vec(),
        }
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// What it printed and logged so far.
    pub fn log(&self) -> String {
        std::iter::once("output.log")
            .chain(self.logs.iter().copied())
            .map(|f| std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits (up to `timeout`) until `ready` holds; fails at once if the program exits.
    pub fn wait_until(&mut self, timeout: Duration, mut ready: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !ready() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{} exited ({status}):\n{}", self.name, self.log());
            }
            assert!(
                Instant::now() < deadline,
                "{} was not ready within {timeout:?}:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(crate::POLL);
        }
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!("--- the end of {}'s log ---", self.name);
            for line in &lines[lines.len().saturating_sub(TAIL)..] {
                eprintln!("{line}");
            }
        }
    }
}
