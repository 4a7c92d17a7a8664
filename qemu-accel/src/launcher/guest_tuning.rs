//! The guest kernel arguments the launcher adds for a VM spread over hosts
//! (`--guest-tuning`, on by default; docs/performance.md has the figures).
//!
//! Every write a guest CPU makes to a page another host's CPU also writes
//! costs a DSM round trip. A Linux guest's own housekeeping is the largest
//! source of such writes while it boots: the CPU with the timekeeping duty
//! writes `jiffies` and the timekeeper at every tick, and with a tickless
//! idle that duty moves to whichever CPU ticks first, on any host; RCU's
//! callbacks and grace-period bookkeeping, unbound workqueues and timers run
//! on every CPU. `nohz_full=` on the CPUs of the other hosts keeps all of it
//! on the origin's CPUs (the kernel's "housekeeping" CPUs: tick duty,
//! offloaded RCU callbacks, unbound kthreads and work, timers), and stops
//! the tick on a remote CPU that runs one task.

use super::spec::VmSpec;
use super::LaunchError;
use crate::placement::{cpu_range_text, cpu_ranges};

/// The arguments added to `append` for `spec`, or `None` when there is
/// nothing to add: one node, tuning off, or the user already chose the
/// kernel's tick and housekeeping setup themselves.
pub fn extra_args(spec: &VmSpec, append: &str) -> Result<Option<String>, LaunchError> {
    if spec.nodes < 2 || !spec.guest_tuning {
        return Ok(None);
    }
    let chosen = |key: &str| {
        append
            .split_ascii_whitespace()
            .any(|a| a == key || a.starts_with(&format!("{key}=")))
    };
    if ["nohz_full", "nohz", "isolcpus", "rcu_nocbs"]
        .iter()
        .any(|k| chosen(k))
    {
        return Ok(None);
    }
    let placement = spec.placement()?;
    let remote: Vec<u32> = (0..placement.vcpus())
        .filter(|&c| !placement.runs_on(c, 0))
        .collect();
    if remote.is_empty() {
        return Ok(None);
    }
    Ok(Some(format!("nohz_full={}", cpu_list(&remote))))
}

/// `[1, 2, 3, 5]` → `1-3,5`.
fn cpu_list(cpus: &[u32]) -> String {
    cpu_ranges(cpus.iter().copied())
        .iter()
        .map(cpu_range_text)
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_are_compact() {
        assert_eq!(cpu_list(&[1, 2, 3, 5]), "1-3,5");
        assert_eq!(cpu_list(&[2]), "2");
        assert_eq!(cpu_list(&[1, 3, 5]), "1,3,5");
    }
}
