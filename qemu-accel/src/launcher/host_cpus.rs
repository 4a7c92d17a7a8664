//! `--host-cpus`: the host CPUs each local node's QEMU may run on.
//!
//! One CPU list for every node (`0-1`), or one per node separated by `/`
//! (`0/1`: node 0 on CPU 0, node 1 on CPU 1). A list is CPUs and ranges
//! separated by commas, as `taskset -c` takes them. The launcher applies it
//! with `sched_setaffinity` in the child before QEMU starts, so every QEMU
//! thread (vCPUs, DSM, I/O) inherits it. The benchmarks use it to confine a
//! node to host cores (`scripts/bench-scale.sh`).

use std::fmt;
use std::str::FromStr;

/// The most CPUs a list may name (the size of the kernel's `cpu_set_t`).
const MAX_CPU: usize = libc::CPU_SETSIZE as usize;

/// Parsed `--host-cpus`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostCpus {
    /// One list for every node, or one per node.
    lists: Vec<Vec<usize>>,
}

/// Why a `--host-cpus` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("host-cpus={text}: {reason}")]
pub struct BadHostCpus {
    text: String,
    reason: String,
}

fn parse_list(text: &str) -> Result<Vec<usize>, String> {
    let mut cpus = Vec::new();
    for part in text.split(',') {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a, b),
            None => (part, part),
        };
        let num = |s: &str| {
            s.trim()
                .parse::<usize>()
                .ok()
                .filter(|&c| c < MAX_CPU)
                .ok_or_else(|| format!("'{part}' is not a CPU number or range below {MAX_CPU}"))
        };
        let (a, b) = (num(a)?, num(b)?);
        if a > b {
            return Err(format!("range '{part}' runs backwards"));
        }
        cpus.extend(a..=b);
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

impl FromStr for HostCpus {
    type Err = BadHostCpus;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = |reason: String| BadHostCpus {
            text: text.to_string(),
            reason,
        };
        if text.trim().is_empty() {
            return Err(bad("expected CPU lists such as 0-1 or 0/1".into()));
        }
        let lists = text
            .split('/')
            .map(parse_list)
            .collect::<Result<Vec<_>, _>>()
            .map_err(bad)?;
        Ok(HostCpus { lists })
    }
}

impl fmt::Display for HostCpus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lists: Vec<String> = self
            .lists
            .iter()
            .map(|l| {
                l.iter()
                    .map(|c| c.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .collect();
        f.write_str(&lists.join("/"))
    }
}

impl HostCpus {
    /// Checks the value against the node count and this machine's CPUs.
    pub fn check(&self, nodes: u32, host_cpus: usize) -> Result<(), BadHostCpus> {
        let bad = |reason: String| BadHostCpus {
            text: self.to_string(),
            reason,
        };
        if self.lists.len() != 1 && self.lists.len() != nodes as usize {
            return Err(bad(format!(
                "{} lists for {nodes} nodes: give one list for every node or one per node",
                self.lists.len()
            )));
        }
        if let Some(c) = self.lists.iter().flatten().find(|&&c| c >= host_cpus) {
            return Err(bad(format!(
                "CPU {c} does not exist here (this host has CPUs 0-{})",
                host_cpus.saturating_sub(1)
            )));
        }
        Ok(())
    }

    /// The CPUs node `node` runs on.
    pub fn for_node(&self, node: u32) -> &[usize] {
        if self.lists.len() == 1 {
            &self.lists[0]
        } else {
            &self.lists[node as usize]
        }
    }
}

/// CPUs this machine has (configured, not only those this process may use).
pub fn configured_cpus() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) };
    usize::try_from(n).unwrap_or(1).max(1)
}

/// Confine the calling process (and the threads it will create) to `cpus`.
/// Async-signal-safe: it is called between `fork` and `exec`.
pub fn confine_self(cpus: &[usize]) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is a plain bit array; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        // SAFETY: `c` < CPU_SETSIZE (checked when parsed), so CPU_SET stays
        // inside `set`.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 is the
    // calling thread, whose mask exec keeps and new threads inherit.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_list_for_every_node_or_one_per_node() {
        let all: HostCpus = "0-1".parse().unwrap();
        assert_eq!(all.for_node(0), &[0, 1]);
        assert_eq!(all.for_node(3), &[0, 1]);
        all.check(4, 2).unwrap();
        let per: HostCpus = "0/1,3".parse().unwrap();
        assert_eq!(per.for_node(0), &[0]);
        assert_eq!(per.for_node(1), &[1, 3]);
        assert_eq!(per.to_string(), "0/1,3");
        per.check(2, 4).unwrap();
    }

    #[test]
    fn bad_lists_are_named() {
        for (text, want) in [
            ("", "expected CPU lists"),
            ("x", "'x' is not a CPU number"),
            ("3-1", "runs backwards"),
            ("0/", "'' is not a CPU number"),
            ("99999", "is not a CPU number or range below"),
        ] {
            let e = text.parse::<HostCpus>().unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
        let e = "0/1/0"
            .parse::<HostCpus>()
            .unwrap()
            .check(2, 2)
            .unwrap_err();
        assert!(e.to_string().contains("3 lists for 2 nodes"), "{e}");
        let e = "0/5".parse::<HostCpus>().unwrap().check(2, 2).unwrap_err();
        assert!(e.to_string().contains("CPU 5 does not exist here"), "{e}");
    }
}
