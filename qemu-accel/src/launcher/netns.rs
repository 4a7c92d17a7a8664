//! One network namespace per node: a veth pair per node, the host ends
//! enslaved to one bridge, addresses 10.214.S.(k+1)/24. Removed on drop.

use std::process::Command;

use super::LaunchError;

fn ip(args: &[&str]) -> Result<(), LaunchError> {
    run_tool("ip", args, "network namespaces need root")
}

/// Run `program` (`ip`, `tc`) with `args`; a failure names the command, its
/// message and `hint`.
pub(super) fn run_tool(program: &str, args: &[&str], hint: &str) -> Result<(), LaunchError> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| LaunchError::Runtime(format!("cannot run {program}: {e}")))?;
    if !out.status.success() {
        return Err(LaunchError::Runtime(format!(
            "{program} {} failed: {} ({hint})",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// The namespaces, bridge and veths of one run.
#[derive(Debug)]
pub struct Netns {
    tag: String,
    made: u32,
    bridge: bool,
}

impl Netns {
    /// Create `nodes` namespaces; returns them and each node's IPv4 address.
    /// `link`: `tc netem` arguments for the host end of every node's veth.
    pub fn create(nodes: u32, link: Option<&str>) -> Result<(Netns, Vec<String>), LaunchError> {
        let pid = std::process::id();
        // Interface names are limited to 15 bytes: "fvl" + 5 digits + "h" + 3 digits.
        let tag = format!("fvl{}", pid % 100_000);
        let subnet = pid % 250 + 1;
        let mut net = Netns {
            tag,
            made: 0,
            bridge: false,
        };
        let br = format!("{}br", net.tag);
        ip(&["link", "add", &br, "type", "bridge"])?;
        net.bridge = true;
        ip(&["link", "set", &br, "up"])?;
        let mut addrs = Vec::new();
        for k in 0..nodes {
            let ns = net.ns(k);
            let host_end = format!("{}h{k}", net.tag);
            ip(&["netns", "add", &ns])?;
            net.made = k + 1;
            ip(&[
                "link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ])?;
            ip(&["link", "set", &host_end, "master", &br, "up"])?;
            if let Some(netem) = link {
                let mut args = vec!["qdisc", "add", "dev", &host_end, "root", "netem"];
                args.extend(netem.split_whitespace());
                run_tool("tc", &args, "tc netem needs root and the sch_netem module")?;
            }
            let a = format!("10.214.{subnet}.{}", k + 1);
            ip(&["-n", &ns, "addr", "add", &format!("{a}/24"), "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            addrs.push(a);
        }
        tracing::debug!(tag = %net.tag, nodes, "network namespaces ready");
        Ok((net, addrs))
    }

    /// Name of node `k`'s namespace.
    pub fn ns(&self, k: u32) -> String {
        format!("{}n{k}", self.tag)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting a namespace deletes its veth end, and so the pair.
        for k in 0..self.made {
            let _ = ip(&["netns", "del", &self.ns(k)]);
        }
        if self.bridge {
            let _ = ip(&["link", "del", &format!("{}br", self.tag)]);
        }
    }
}
