//! Running the node processes: spawn, stream their output, forward signals,
//! and decide the VM's exit status.
//!
//! Each node runs in its own process group, so a Ctrl-C in the terminal
//! reaches only the launcher, which forwards it. The origin's stdout (its
//! serial console) is copied byte for byte to the launcher's stdout as it
//! arrives; every node's stderr, and the other nodes' stdout, go to the
//! launcher's stderr one line at a time, prefixed with `[node K]`.
//!
//! When the first node exits (or a signal or the overall timeout arrives),
//! the others get `stop_timeout` to stop on their own; at half of it they
//! get SIGTERM, at the end SIGKILL. Nothing waits longer than that.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use super::host_cpus::{self, HostCpus};
use super::LaunchError;

/// One node process to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCommand {
    /// Node id (0 is the origin).
    pub node: u32,
    /// Program to run (QEMU, or `ip` for `ip netns exec`).
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// A host VM's status report ([`super::virtual_hosts::node_status`]):
    /// when set, the program is a host VM and the node's exit status is
    /// the one reported there.
    pub exit_report: Option<PathBuf>,
}

/// How to supervise the nodes.
#[derive(Debug, Clone)]
pub struct Supervision {
    /// Time the others get to stop after the first exit, a signal or the
    /// overall timeout.
    pub stop_timeout: Duration,
    /// Limit on the whole run.
    pub timeout: Option<Duration>,
    /// Copy the launcher's stdin to the origin's serial console.
    pub forward_stdin: bool,
    /// Host CPUs each node's process is confined to.
    pub host_cpus: Option<HostCpus>,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Exit status of every node, by node id.
    pub statuses: Vec<ExitStatus>,
    /// The first node seen to fail on its own, and how.
    pub first_failure: Option<(u32, ExitStatus)>,
    /// The first node that exited at all.
    pub first_exit: Option<u32>,
    /// Nodes still running at the end of the stop timeout (then killed).
    pub hung: Vec<u32>,
    /// The signal that interrupted the launcher, if any.
    pub interrupted: Option<i32>,
    /// Whether the overall timeout expired.
    pub timed_out: bool,
}

/// Describe an exit status in words.
pub fn describe_status(s: ExitStatus) -> String {
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(sig)) => format!("killed by signal {sig} ({})", signal_name(sig)),
        _ => s.to_string(),
    }
}

/// Conventional name of a signal number.
pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        _ => "signal",
    }
}

fn status_code(s: ExitStatus) -> u8 {
    match (s.code(), s.signal()) {
        (Some(c), _) if c != 0 => u8::try_from(c & 0xff).unwrap_or(1).max(1),
        (None, Some(sig)) => u8::try_from(128 + sig).unwrap_or(1),
        _ => 1,
    }
}

fn node_role(k: u32) -> &'static str {
    if k == 0 {
        " (origin)"
    } else {
        ""
    }
}

impl Outcome {
    /// The launcher's exit code and, unless every node exited 0, a message
    /// that says why.
    pub fn verdict(&self, stop_timeout: Duration) -> (u8, Option<String>) {
        let hung = || {
            if self.hung.is_empty() {
                String::new()
            } else {
                format!(
                    "; node(s) {} did not stop within {:.1} s and were killed",
                    self.hung
                        .iter()
                        .map(u32::to_string)
                        .collect::<Vec<_>>()
                        .join(", "),
                    stop_timeout.as_secs_f64()
                )
            }
        };
        if let Some(sig) = self.interrupted {
            return (
                u8::try_from(128 + sig).unwrap_or(1),
                Some(format!(
                    "interrupted by {}; stopped all nodes{}",
                    signal_name(sig),
                    hung()
                )),
            );
        }
        if self.timed_out {
            return (
                124,
                Some(format!(
                    "the VM ran past its timeout; stopped all nodes{}",
                    hung()
                )),
            );
        }
        if let Some((k, s)) = self.first_failure {
            return (
                status_code(s),
                Some(format!(
                    "node {k}{} failed first: {}{}",
                    node_role(k),
                    describe_status(s),
                    hung()
                )),
            );
        }
        if !self.hung.is_empty() {
            let first = self.first_exit.unwrap_or(0);
            return (
                1,
                Some(format!(
                    "node {first}{} exited 0 but the others did not follow{}",
                    node_role(first),
                    hung()
                )),
            );
        }
        (0, None)
    }
}

static PENDING_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    PENDING_SIGNAL.store(sig, Ordering::SeqCst);
}

/// Catch SIGINT, SIGTERM and SIGHUP so they can be forwarded to the nodes.
fn install_signal_handlers() -> Result<(), LaunchError> {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: `sigaction` is zero-initialisable plain data; the handler
        // only stores to an atomic, which is async-signal-safe; the pointers
        // passed point to live locals for the duration of the calls.
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(LaunchError::Runtime(format!(
                "cannot install a handler for signal {sig}: {}",
                std::io::Error::last_os_error()
            )));
        }
    }
    Ok(())
}

/// Send `sig` to a node's process group (the node and anything it started).
fn signal_node(child: &Child, sig: i32) {
    let Ok(pid) = libc::pid_t::try_from(child.id()) else {
        return;
    };
    // SAFETY: killpg has no memory-safety preconditions. The child is not
    // yet reaped (callers only signal nodes without a status), so its
    // process group id cannot have been reused.
    let rc = unsafe { libc::killpg(pid, sig) };
    if rc != 0 {
        tracing::debug!(pid, sig, err = %std::io::Error::last_os_error(), "killpg failed");
    }
}

/// Whether reading stdin is safe and useful: not a terminal, or a terminal
/// whose foreground process group is ours (reading it from the background
/// would stop the launcher with SIGTTIN).
pub fn stdin_forwardable() -> bool {
    // SAFETY: isatty, tcgetpgrp and getpgrp take no pointers and have no
    // memory-safety preconditions.
    unsafe {
        if libc::isatty(0) == 0 {
            return true;
        }
        libc::tcgetpgrp(0) == libc::getpgrp()
    }
}

fn copy_raw(mut from: impl Read, done: mpsc::Sender<()>) {
    let mut buf = [0u8; 8192];
    let stdout = std::io::stdout();
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let mut out = stdout.lock();
                // A closed stdout must not stop the VM: keep draining.
                let _ = out.write_all(&buf[..n]);
                let _ = out.flush();
            }
        }
    }
    let _ = done.send(());
}

fn copy_prefixed(from: impl Read, prefix: String, done: mpsc::Sender<()>) {
    let mut r = BufReader::new(from);
    let mut line = Vec::new();
    loop {
        line.clear();
        match r.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let text = String::from_utf8_lossy(&line);
                let text = text.trim_end_matches(['\n', '\r']);
                let mut err = std::io::stderr().lock();
                let _ = writeln!(err, "{prefix}{text}");
            }
        }
    }
    let _ = done.send(());
}

fn forward_stdin(mut to: ChildStdin) {
    let mut buf = [0u8; 4096];
    let mut stdin = std::io::stdin();
    loop {
        match stdin.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).and_then(|()| to.flush()).is_err() {
                    break;
                }
            }
        }
    }
}

struct Running {
    node: u32,
    exit_report: Option<PathBuf>,
    child: Child,
    status: Option<ExitStatus>,
    signaled: bool,
}

/// Start every node and supervise them until all have exited.
pub fn run_nodes(commands: &[NodeCommand], sup: &Supervision) -> Result<Outcome, LaunchError> {
    install_signal_handlers()?;
    let (done_tx, done_rx) = mpsc::channel();
    let mut streams = 0usize;
    let mut nodes: Vec<Running> = Vec::new();
    for cmd in commands {
        let origin = cmd.node == 0;
        let mut c = Command::new(&cmd.program);
        c.args(&cmd.args)
            .stdin(if origin && sup.forward_stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        if let Some(cpus) = &sup.host_cpus {
            let cpus = cpus.for_node(cmd.node).to_vec();
            // SAFETY: the closure runs between fork and exec and calls only
            // sched_setaffinity (async-signal-safe); `cpus` was allocated
            // before the fork.
            unsafe { c.pre_exec(move || host_cpus::confine_self(&cpus)) };
        }
        tracing::debug!(node = cmd.node, program = %cmd.program.display(), args = ?cmd.args, "starting node");
        let mut child = match c.spawn() {
            Ok(child) => child,
            Err(e) => {
                for n in &mut nodes {
                    signal_node(&n.child, libc::SIGKILL);
                    let _ = n.child.wait();
                }
                return Err(LaunchError::Runtime(format!(
                    "cannot start node {} ({}): {e}",
                    cmd.node,
                    cmd.program.display()
                )));
            }
        };
        if let Some(stdin) = child.stdin.take() {
            thread::spawn(move || forward_stdin(stdin));
        }
        if let Some(out) = child.stdout.take() {
            let tx = done_tx.clone();
            if origin {
                thread::spawn(move || copy_raw(out, tx));
            } else {
                let prefix = format!("[node {}] ", cmd.node);
                thread::spawn(move || copy_prefixed(out, prefix, tx));
            }
            streams += 1;
        }
        if let Some(err) = child.stderr.take() {
            let tx = done_tx.clone();
            let prefix = format!("[node {}] ", cmd.node);
            thread::spawn(move || copy_prefixed(err, prefix, tx));
            streams += 1;
        }
        if cmd.exit_report.is_some() {
            eprintln!("fragvisor: host VM {}: pid {}", cmd.node, child.id());
        } else {
            eprintln!("fragvisor: node {}: pid {}", cmd.node, child.id());
        }
        nodes.push(Running {
            node: cmd.node,
            exit_report: cmd.exit_report.clone(),
            child,
            status: None,
            signaled: false,
        });
    }
    drop(done_tx);

    let start = Instant::now();
    let mut outcome = Outcome {
        statuses: Vec::new(),
        first_failure: None,
        first_exit: None,
        hung: Vec::new(),
        interrupted: None,
        timed_out: false,
    };
    let mut stop_since: Option<Instant> = None;
    let mut termed = false;
    let mut killed = false;
    let signal_alive = |nodes: &mut Vec<Running>, sig: i32| {
        for n in nodes.iter_mut().filter(|n| n.status.is_none()) {
            n.signaled = true;
            signal_node(&n.child, sig);
        }
    };
    loop {
        let now = Instant::now();
        let sig = PENDING_SIGNAL.swap(0, Ordering::SeqCst);
        if sig != 0 {
            if outcome.interrupted.is_none() {
                tracing::info!(signal = sig, "forwarding signal to all nodes");
                outcome.interrupted = Some(sig);
                signal_alive(&mut nodes, sig);
                stop_since.get_or_insert(now);
            } else {
                // A second signal: stop waiting.
                signal_alive(&mut nodes, libc::SIGKILL);
            }
        }
        if let Some(limit) = sup.timeout {
            if !outcome.timed_out && now.duration_since(start) >= limit {
                outcome.timed_out = true;
                signal_alive(&mut nodes, libc::SIGTERM);
                stop_since.get_or_insert(now);
            }
        }
        for n in nodes.iter_mut().filter(|n| n.status.is_none()) {
            let status = n.child.try_wait().map_err(|e| {
                LaunchError::Runtime(format!("cannot wait for node {}: {e}", n.node))
            })?;
            let Some(mut s) = status else { continue };
            if let Some(report) = &n.exit_report {
                let (node, why) = super::virtual_hosts::node_status(s, report);
                // A host VM the launcher stopped has no report to give.
                if let Some(why) = why.filter(|_| !n.signaled) {
                    eprintln!("fragvisor: host VM {}: {why}", n.node);
                }
                s = node;
            }
            n.status = Some(s);
            tracing::debug!(node = n.node, status = %s, "node exited");
            if outcome.first_exit.is_none() {
                outcome.first_exit = Some(n.node);
                stop_since.get_or_insert(now);
            }
            if !s.success() && !n.signaled && outcome.first_failure.is_none() {
                outcome.first_failure = Some((n.node, s));
            }
        }
        if nodes.iter().all(|n| n.status.is_some()) {
            break;
        }
        if let Some(t0) = stop_since {
            let waited = now.duration_since(t0);
            if !termed && waited >= sup.stop_timeout / 2 {
                termed = true;
                tracing::info!("nodes still running after {:?}: SIGTERM", waited);
                signal_alive(&mut nodes, libc::SIGTERM);
            }
            if !killed && waited >= sup.stop_timeout {
                killed = true;
                outcome.hung = nodes
                    .iter()
                    .filter(|n| n.status.is_none())
                    .map(|n| n.node)
                    .collect();
                tracing::info!(hung = ?outcome.hung, "nodes still running at the stop timeout: SIGKILL");
                signal_alive(&mut nodes, libc::SIGKILL);
            }
        }
        thread::sleep(Duration::from_millis(20));
    }

    // Let the output threads finish the last bytes; a grandchild that
    // still holds a pipe open must not keep the launcher alive.
    let drain_deadline = Instant::now() + Duration::from_secs(2);
    for _ in 0..streams {
        let left = drain_deadline.saturating_duration_since(Instant::now());
        if done_rx.recv_timeout(left).is_err() {
            break;
        }
    }
    outcome.statuses = nodes
        .iter()
        .map(|n| n.status.unwrap_or_else(|| ExitStatus::from_raw(0)))
        .collect();
    Ok(outcome)
}
