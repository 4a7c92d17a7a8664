//! The VMs `fragvisor run` is running on this machine, so that
//! `fragvisor ssh [NAME]` can find one: a small TOML file per VM in the
//! run directory (`$XDG_RUNTIME_DIR/fragvisor`, or `/run/fragvisor` for
//! root, or `/tmp/fragvisor-<uid>`), written when the VM starts and
//! removed when it ends. A file whose launcher is gone is stale and is
//! ignored (and removed).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::devices::GUEST_HOST_KEY_ALIAS;
use super::LaunchError;

/// What `fragvisor ssh` needs to log into a running VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct VmEntry {
    /// The VM's name.
    pub name: String,
    /// The launcher's pid.
    pub pid: u32,
    /// The host port forwarded to the guest's port 22 on 127.0.0.1 or
    /// every address.
    pub ssh_port: u16,
    /// The host address of that forward.
    pub ssh_host: String,
    /// Root's key.
    pub ssh_key: Option<PathBuf>,
    /// The guest's host key (alias [`GUEST_HOST_KEY_ALIAS`]), if known.
    pub known_hosts: Option<PathBuf>,
}

/// The directory of the entries.
pub fn run_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_RUNTIME_DIR") {
        return PathBuf::from(x).join("fragvisor");
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        PathBuf::from("/run/fragvisor")
    } else {
        PathBuf::from(format!("/tmp/fragvisor-{uid}"))
    }
}

fn alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// A registered VM; its file is removed on drop.
#[derive(Debug)]
pub struct Registration {
    path: PathBuf,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Register `entry`. Refused when a live VM already has the name.
pub fn register(entry: &VmEntry) -> Result<Registration, LaunchError> {
    let dir = run_dir();
    std::fs::create_dir_all(&dir)
        .map_err(|e| LaunchError::Runtime(format!("cannot create {}: {e}", dir.display())))?;
    let path = dir.join(format!("{}.toml", entry.name));
    if let Some(old) = read_entry(&path) {
        if alive(old.pid) && old.pid != std::process::id() {
            return Err(LaunchError::Usage(format!(
                "a VM named {} is already running (launcher pid {}); choose another --name",
                entry.name, old.pid
            )));
        }
    }
    let text = toml::to_string(entry)
        .map_err(|e| LaunchError::Runtime(format!("cannot write the VM entry: {e}")))?;
    let tmp = dir.join(format!(".{}.{}", entry.name, std::process::id()));
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| LaunchError::Runtime(format!("cannot write {}: {e}", path.display())))?;
    Ok(Registration { path })
}

fn read_entry(path: &Path) -> Option<VmEntry> {
    toml::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

/// The VMs running now, by name; stale entries are removed.
pub fn running() -> Vec<VmEntry> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(run_dir()) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.extension().is_none_or(|x| x != "toml") {
            continue;
        }
        match read_entry(&p) {
            Some(v) if alive(v.pid) => out.push(v),
            _ => {
                let _ = std::fs::remove_file(&p);
            }
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The running VM called `name`, or the only one.
pub fn find(name: Option<&str>) -> Result<VmEntry, LaunchError> {
    let vms = running();
    let names = || {
        vms.iter()
            .map(|v| v.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match name {
        Some(n) => vms.iter().find(|v| v.name == n).cloned().ok_or_else(|| {
            LaunchError::Usage(if vms.is_empty() {
                format!("no VM named {n} is running (none is)")
            } else {
                format!("no VM named {n} is running (running: {})", names())
            })
        }),
        None => match vms.len() {
            0 => Err(LaunchError::Usage(
                "no VM with an ssh forward is running on this machine".into(),
            )),
            1 => Ok(vms[0].clone()),
            _ => Err(LaunchError::Usage(format!(
                "several VMs are running ({}): name one",
                names()
            ))),
        },
    }
}

/// The `ssh` arguments (without the program) that log into `vm` and run
/// `cmd` there (a login shell when empty).
pub fn ssh_args(vm: &VmEntry, cmd: &[String]) -> Vec<String> {
    let mut a: Vec<String> = ["BatchMode=yes", "ConnectTimeout=60", "LogLevel=ERROR"]
        .iter()
        .flat_map(|o| ["-o".to_string(), o.to_string()])
        .collect();
    a.extend(login_args(vm));
    if cmd.is_empty() {
        a.push("-t".into());
    }
    a.push(format!("root@{}", vm.ssh_host));
    a.extend(cmd.iter().cloned());
    a
}

/// What reaching `vm` takes, for scripts and for a person alike: its host
/// key, root's key and the forwarded port (no destination).
pub fn login_args(vm: &VmEntry) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut opt = |s: String| {
        a.push("-o".into());
        a.push(s);
    };
    match &vm.known_hosts {
        Some(k) => {
            opt(format!("UserKnownHostsFile={}", k.display()));
            opt(format!("HostKeyAlias={GUEST_HOST_KEY_ALIAS}"));
            opt("StrictHostKeyChecking=yes".into());
        }
        None => {
            // An image of the user's own: its host key is learnt on first
            // use, per VM.
            opt(format!(
                "UserKnownHostsFile={}",
                run_dir().join(format!("{}.known_hosts", vm.name)).display()
            ));
            opt("StrictHostKeyChecking=accept-new".into());
        }
    }
    if let Some(k) = &vm.ssh_key {
        a.push("-i".into());
        a.push(k.display().to_string());
        a.push("-o".into());
        a.push("IdentitiesOnly=yes".into());
    }
    a.push("-p".into());
    a.push(vm.ssh_port.to_string());
    a
}

/// `fragvisor ssh`: run ssh and exit with its status. With a `wait`,
/// first wait for the VM to be registered, then probe quietly (`ssh ...
/// true`, output dropped) until the guest's sshd answers or the time is
/// up, so a guest that is still booting costs no error messages.
pub fn ssh(name: Option<&str>, wait: Duration, cmd: &[String]) -> Result<ExitCode, LaunchError> {
    let deadline = Instant::now() + wait;
    // A VM started a moment ago may not have registered yet.
    let vm = loop {
        match find(name) {
            Ok(vm) => break vm,
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    let run = |args: &[String], quiet: bool| {
        let mut c = Command::new("ssh");
        c.args(args);
        if quiet {
            c.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
        }
        c.status()
            .map(|s| s.code().unwrap_or(255))
            .map_err(|e| LaunchError::Runtime(format!("cannot run ssh: {e}")))
    };
    if !wait.is_zero() {
        let probe = ssh_args(&vm, &["true".to_string()]);
        while Instant::now() < deadline && alive(vm.pid) && run(&probe, true)? != 0 {
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    let code = run(&ssh_args(&vm, cmd), false)?;
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(255)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssh_arguments() {
        let vm = VmEntry {
            name: "a".into(),
            pid: 1,
            ssh_port: 2222,
            ssh_host: "127.0.0.1".into(),
            ssh_key: Some("/k/id".into()),
            known_hosts: Some("/k/known_hosts".into()),
        };
        let a = ssh_args(&vm, &["nproc".into()]).join(" ");
        assert!(a.contains("-i /k/id"), "{a}");
        assert!(a.contains("HostKeyAlias=fragvisor-guest"), "{a}");
        assert!(a.ends_with("-p 2222 root@127.0.0.1 nproc"), "{a}");
        let t = toml::to_string(&vm).unwrap();
        assert_eq!(toml::from_str::<VmEntry>(&t).unwrap(), vm);
    }
}
