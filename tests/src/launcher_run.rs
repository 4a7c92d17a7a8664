//! Run the `fragvisor` launcher (`FRAGVISOR_LAUNCHER`) from a test: its
//! output line by line with arrival times, waits for lines, and its end.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// The path in environment variable `var` (naming `what`); panics when
/// unset or missing: the tests never skip.
pub fn env_path(var: &str, what: &str) -> PathBuf {
    let p = std::env::var_os(var).unwrap_or_else(|| {
        panic!("{var} is not set: it names {what} (scripts/qemu/e2e.sh sets it)")
    });
    let p = PathBuf::from(p);
    assert!(p.exists(), "{var}={} does not exist", p.display());
    p
}

/// The `fragvisor` launcher, from `FRAGVISOR_LAUNCHER`.
pub fn launcher() -> PathBuf {
    env_path("FRAGVISOR_LAUNCHER", "the fragvisor launcher binary")
}

/// One line of the launcher's output, with when it came.
pub struct Line {
    /// When it came.
    pub at: Instant,
    /// From stderr.
    pub err: bool,
    /// The text, without line ends or carriage returns.
    pub text: String,
}

/// A running `fragvisor` command.
pub struct LauncherRun {
    child: Child,
    lines: mpsc::Receiver<Line>,
    /// The lines read so far.
    pub seen: Vec<Line>,
    start: Instant,
}

/// How a run ended.
pub struct Finished {
    /// `None` when it was stopped at its timeout.
    pub status: Option<ExitStatus>,
    /// Its stdout (the origin's console).
    pub stdout: String,
    /// Its stderr.
    pub stderr: String,
    /// From start to end.
    pub elapsed: Duration,
}

impl Finished {
    /// Everything it printed, for assertion messages.
    pub fn transcript(&self) -> String {
        format!(
            "--- status {:?} after {:.1} s\n--- stdout\n{}\n--- stderr\n{}",
            self.status,
            self.elapsed.as_secs_f64(),
            self.stdout,
            self.stderr
        )
    }

    /// Its exit code.
    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }
}

fn pump<R: Read + Send + 'static>(from: R, err: bool, tx: mpsc::Sender<Line>) {
    thread::spawn(move || {
        let mut r = BufReader::new(from);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&buf)
                        .trim_end_matches(['\n', '\r'])
                        .replace('\r', "");
                    if tx
                        .send(Line {
                            at: Instant::now(),
                            err,
                            text,
                        })
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    });
}

impl LauncherRun {
    /// `fragvisor ARGS...` (the launcher from [`launcher`]), stdin closed,
    /// stdout and stderr read line by line.
    pub fn start(args: &[String]) -> LauncherRun {
        let mut cmd = Command::new(launcher());
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start the fragvisor launcher");
        let (tx, rx) = mpsc::channel();
        pump(child.stdout.take().expect("stdout"), false, tx.clone());
        pump(child.stderr.take().expect("stderr"), true, tx);
        LauncherRun {
            child,
            lines: rx,
            seen: Vec::new(),
            start: Instant::now(),
        }
    }

    /// The launcher's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until a line contains `needle`; returns when it came.
    pub fn wait_line(&mut self, needle: &str, timeout: Duration) -> Option<Instant> {
        self.wait_any(&[needle], timeout).map(|(_, at)| at)
    }

    /// Waits until a line contains one of `needles` (an earlier line
    /// counts); returns which one and when it came.
    pub fn wait_any(&mut self, needles: &[&str], timeout: Duration) -> Option<(usize, Instant)> {
        let hit = |l: &Line| {
            needles
                .iter()
                .position(|n| l.text.contains(n))
                .map(|i| (i, l.at))
        };
        if let Some(h) = self.seen.iter().find_map(hit) {
            return Some(h);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    let h = hit(&l);
                    self.seen.push(l);
                    if h.is_some() {
                        return h;
                    }
                }
                Err(_) => return None,
            }
        }
    }

    /// Waits until `count` lines (all told) contain `needle`.
    pub fn wait_count(&mut self, needle: &str, count: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.seen.iter().filter(|l| l.text.contains(needle)).count() >= count {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => self.seen.push(l),
                Err(_) => return false,
            }
        }
    }

    /// The pid the launcher announced for node (or host VM) `k`:
    /// `what` is "node" or "host VM".
    pub fn announced_pid(&mut self, what: &str, k: u32) -> i32 {
        let needle = format!("fragvisor: {what} {k}: pid ");
        self.wait_line(&needle, Duration::from_secs(30))
            .expect("the launcher names each node's pid");
        let line = self
            .seen
            .iter()
            .find_map(|l| l.text.strip_prefix(&needle))
            .expect("pid line");
        line.trim().parse().expect("a pid")
    }

    /// Waits for the launcher to end (killing it at `timeout`).
    pub fn finish(mut self, timeout: Duration) -> Finished {
        let deadline = self.start + timeout;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                break Some(s);
            }
            if Instant::now() >= deadline {
                // SIGINT: the launcher stops its nodes (and removes its
                // namespaces); a second signal would kill them outright.
                let _ = Command::new("kill")
                    .args(["-INT", &self.child.id().to_string()])
                    .status();
                thread::sleep(Duration::from_secs(20));
                let _ = self.child.kill();
                let _ = self.child.wait();
                break None;
            }
            thread::sleep(Duration::from_millis(100));
        };
        let elapsed = self.start.elapsed();
        // The pumps end when the pipes close.
        let drain = Instant::now() + Duration::from_secs(5);
        while let Ok(l) = self
            .lines
            .recv_timeout(drain.saturating_duration_since(Instant::now()))
        {
            self.seen.push(l);
        }
        let join = |err: bool| {
            self.seen
                .iter()
                .filter(|l| l.err == err)
                .map(|l| l.text.as_str())
                .collect::<Vec<_>>()
                .join("\n")
        };
        Finished {
            status,
            stdout: join(false),
            stderr: join(true),
            elapsed,
        }
    }
}

impl Drop for LauncherRun {
    /// A test that fails half-way leaves no VM behind: SIGINT (the
    /// launcher stops its nodes), then SIGKILL after 20 s.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = Command::new("kill")
                .args(["-INT", &self.child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
                thread::sleep(Duration::from_millis(100));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
