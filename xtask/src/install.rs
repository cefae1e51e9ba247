//! `cargo xtask install [--prefix DIR]`: Capybara as a system service.
//!
//! Builds the release binaries (`capybara-agent`, `capybara`), asks the built `capybara` for the
//! files generated from its clap definitions (`capybara generate`: man pages, bash/zsh/fish
//! completions, the commented default `agent.toml`) and installs them with the systemd unit
//! [`unit`] writes:
//!
//! | what | without `--prefix` | with `--prefix DIR` |
//! |---|---|---|
//! | binaries | `/usr/local/bin` | `DIR/bin` |
//! | man pages | `/usr/local/share/man/man{1,8}` | `DIR/share/man/man{1,8}` |
//! | completions | `/usr/local/share/{bash-completion/completions, zsh/site-functions, fish/vendor_completions.d}` | the same under `DIR/share` |
//! | configuration | `/etc/capybara/agent.toml` | `DIR/etc/capybara/agent.toml` |
//! | systemd unit | `/etc/systemd/system/capybara-agent.service` | `DIR/etc/systemd/system/capybara-agent.service` |
//!
//! A prefix install is self-contained: its unit starts `DIR/bin/capybara-agent --config
//! DIR/etc/capybara/agent.toml` (`systemctl link` it to use it), and nothing outside `DIR` is
//! touched, so tests install into a temporary directory.
//!
//! Idempotent: a file whose content is already the one to install is left alone (a second run
//! reports every file unchanged and reloads nothing). The configuration is never overwritten:
//! an `agent.toml` that differs from the one to install (the admin edited it) stays, and the new
//! default goes to `agent.toml.new` beside it, which the run says. Without `--prefix`, on a
//! machine run by systemd, a changed unit is followed by `systemctl daemon-reload`; enabling and
//! starting the service is left to the admin (the command is printed).

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

use crate::exec::{self, cmd};

/// The binaries installed, both from the `capybara-agent` crate.
const BINARIES: [&str; 2] = ["capybara-agent", "capybara"];
/// The unit's file name.
pub const UNIT_NAME: &str = "capybara-agent.service";

/// Flags of `cargo xtask install`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Install everything under DIR (DIR/bin, DIR/share, DIR/etc) instead of /usr/local and
    /// /etc; nothing outside DIR is touched.
    #[arg(long, value_name = "DIR")]
    prefix: Option<PathBuf>,
    /// Install the binaries found in DIR (e.g. a CI artifact or a debug build) instead of
    /// building the release binaries.
    #[arg(long, value_name = "DIR")]
    binaries_from: Option<PathBuf>,
}

/// Where each kind of file goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Binaries.
    pub bin: PathBuf,
    /// Man pages (`man1`, `man8` below it).
    pub man: PathBuf,
    /// bash-completion files.
    pub bash: PathBuf,
    /// zsh functions.
    pub zsh: PathBuf,
    /// fish completions.
    pub fish: PathBuf,
    /// `/etc/capybara`.
    pub config_dir: PathBuf,
    /// Where the unit goes.
    pub unit_dir: PathBuf,
    /// Whether this is the system's own layout (then systemd is told about a changed unit).
    pub system: bool,
}

impl Layout {
    /// The layout for `prefix` (see the module's table).
    pub fn new(prefix: Option<&Path>) -> Self {
        let (usr, etc) = match prefix {
            Some(p) => (p.to_owned(), p.join("etc")),
            None => (PathBuf::from("/usr/local"), PathBuf::from("/etc")),
        };
        let share = usr.join("share");
        Layout {
            bin: usr.join("bin"),
            man: share.join("man"),
            bash: share.join("bash-completion/completions"),
            zsh: share.join("zsh/site-functions"),
            fish: share.join("fish/vendor_completions.d"),
            config_dir: etc.join("capybara"),
            unit_dir: etc.join("systemd/system"),
            system: prefix.is_none(),
        }
    }

    /// The installed configuration file.
    pub fn config_file(&self) -> PathBuf {
        self.config_dir.join("agent.toml")
    }
}

/// Runs `cargo xtask install`.
pub fn run(args: &Args) -> Result<()> {
    let prefix = match &args.prefix {
        Some(p) => {
            Some(std::path::absolute(p).with_context(|| format!("--prefix {}", p.display()))?)
        }
        None => None,
    };
    let binaries = match &args.binaries_from {
        Some(dir) => dir.clone(),
        None => {
            let mut build = cmd("cargo");
            build.args(["build", "--release", "-p", "capybara-agent"]);
            for bin in BINARIES {
                build.args(["--bin", bin]);
            }
            exec::run(&mut build)?;
            exec::target_dir()?.join("release")
        }
    };
    let layout = Layout::new(prefix.as_deref());
    install(&binaries, &layout)
}

/// Installs the binaries in `binaries` and everything generated from them into `layout`.
pub fn install(binaries: &Path, layout: &Layout) -> Result<()> {
    for bin in BINARIES {
        let path = binaries.join(bin);
        if !path.is_file() {
            bail!(
                "{} missing (build it, or give --binaries-from the directory holding it)",
                path.display()
            );
        }
    }
    let staging = staging_dir()?;
    exec::run(
        cmd(binaries.join("capybara"))
            .args(["generate", "--out"])
            .arg(&staging),
    )?;
    let mut report = Report::default();
    for bin in BINARIES {
        report.file(&binaries.join(bin), &layout.bin.join(bin), 0o755)?;
    }
    for section in ["man1", "man8"] {
        let from = staging.join("man").join(section);
        for entry in sorted_entries(&from)? {
            let name = entry.file_name().context("man page without a name")?;
            report.file(&entry, &layout.man.join(section).join(name), 0o644)?;
        }
    }
    for (shell, dir) in [
        ("bash", &layout.bash),
        ("zsh", &layout.zsh),
        ("fish", &layout.fish),
    ] {
        for entry in sorted_entries(&staging.join("completions").join(shell))? {
            let name = entry.file_name().context("completion without a name")?;
            report.file(&entry, &dir.join(name), 0o644)?;
        }
    }
    let unit_path = layout.unit_dir.join(UNIT_NAME);
    let unit_changed = report.bytes(unit(layout).as_bytes(), &unit_path, 0o644)?;
    report.config(
        &std::fs::read(staging.join("agent.toml"))?,
        &layout.config_file(),
    )?;
    std::fs::remove_dir_all(&staging).ok();

    exec::say(format_args!(
        "install: {} files installed or updated, {} unchanged",
        report.changed, report.unchanged
    ));
    if layout.system {
        if unit_changed && Path::new("/run/systemd/system").is_dir() {
            exec::run(cmd("systemctl").arg("daemon-reload"))?;
        }
        exec::say(format_args!(
            "install: start it with `systemctl enable --now capybara-agent` (settings: {})",
            layout.config_file().display()
        ));
    } else {
        exec::say(format_args!(
            "install: to run this copy as the service: `systemctl link {}` then `systemctl enable --now capybara-agent`",
            unit_path.display()
        ));
    }
    Ok(())
}

/// A fresh directory for `capybara generate`'s output, in the system's temporary directory.
fn staging_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("capybara-install-{}", std::process::id()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    Ok(dir)
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("read {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("read {}", dir.display()))?;
    v.sort();
    Ok(v)
}

/// Counts what an install did, and prints each change.
#[derive(Debug, Default)]
struct Report {
    changed: usize,
    unchanged: usize,
}

impl Report {
    fn file(&mut self, from: &Path, to: &Path, mode: u32) -> Result<bool> {
        let bytes = std::fs::read(from).with_context(|| format!("read {}", from.display()))?;
        self.bytes(&bytes, to, mode)
    }

    /// Writes `bytes` to `to` with `mode` unless it already holds them; true if it wrote.
    fn bytes(&mut self, bytes: &[u8], to: &Path, mode: u32) -> Result<bool> {
        let wrote = write_if_changed(bytes, to, mode)?;
        if wrote {
            self.changed += 1;
            exec::say(format_args!("install: {}", to.display()));
        } else {
            self.unchanged += 1;
        }
        Ok(wrote)
    }

    /// The configuration: written only where there is none (or it is already this one); an
    /// existing file that differs stays, and the new default goes beside it as `.new`.
    fn config(&mut self, bytes: &[u8], to: &Path) -> Result<()> {
        match std::fs::read(to) {
            Ok(existing) if existing == bytes => {
                self.unchanged += 1;
                Ok(())
            }
            Ok(_) => {
                let new = to.with_extension("toml.new");
                self.bytes(bytes, &new, 0o644)?;
                exec::say(format_args!(
                    "install: kept {} (it differs from the default: edited); the new default is {}",
                    to.display(),
                    new.display()
                ));
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.bytes(bytes, to, 0o644)?;
                Ok(())
            }
            Err(e) => Err(e).with_context(|| format!("read {}", to.display())),
        }
    }
}

/// Writes `bytes` to `to` (creating its directory) unless it already holds exactly them with
/// `mode`: a temporary file beside it, then a rename, so a reader (or a running binary being
/// replaced) never sees half a file.
fn write_if_changed(bytes: &[u8], to: &Path, mode: u32) -> Result<bool> {
    if let (Ok(existing), Ok(meta)) = (std::fs::read(to), std::fs::metadata(to))
        && existing == bytes
        && meta.permissions().mode() & 0o7777 == mode
    {
        return Ok(false);
    }
    let dir = to.parent().context("install target without a directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let name = to.file_name().context("install target without a name")?;
    let tmp = dir.join(format!(".{}.install-tmp", name.to_string_lossy()));
    std::fs::write(&tmp, bytes).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", tmp.display()))?;
    std::fs::rename(&tmp, to)
        .with_context(|| format!("rename {} to {}", tmp.display(), to.display()))?;
    Ok(true)
}

/// The systemd unit for `layout`'s binary and configuration file.
///
/// The capabilities, measured by starting the agent (programs loaded and attached, tunnel up,
/// API serving) with one dropped at a time from its bounding set (`setpriv --bounding-set`),
/// are explained in the unit's comments; every other hardening setting is chosen so that what the agent touches (bpffs
/// pins, `/dev/net/tun`, its data, socket and UAPI directories, netlink) stays reachable.
pub fn unit(layout: &Layout) -> String {
    let exe = layout.bin.join("capybara-agent");
    let config = layout.config_file();
    format!(
        r#"# The Capybara WireGuard server agent (installed by `cargo xtask install`).
# Settings: {config} (every key is a capybara-agent flag; `man capybara-agent`).
# Local changes: `systemctl edit capybara-agent` (a drop-in), not this file: a reinstall
# replaces it.

[Unit]
Description=Capybara WireGuard server agent
Documentation=man:capybara-agent(8) man:capybara(1)
Wants=network-online.target
After=network-online.target

[Service]
# READY=1 once the kernel programs are attached, the tunnel is up and the API's listeners are
# bound; STOPPING=1 when the shutdown begins.
Type=notify
NotifyAccess=main
ExecStart={exe} --config {config}
Restart=on-failure
RestartSec=2s
# Loading and verifying the programs and restoring the store can take a while on a big store.
TimeoutStartSec=120s
# The shutdown closes open sessions in the store (synced writes).
TimeoutStopSec=60s

# Capabilities: the agent runs as root with only these in its bounding set. Measured on Linux
# 6.18 by starting the agent (programs loaded and attached to the tunnel and an uplink, API
# serving), then again on the pins it left, under `setpriv --bounding-set` with one dropped:
# - CAP_BPF: create and pin the maps, load the programs (bpf(2)).
# - CAP_NET_ADMIN: the TUN device, its addresses and routes, attaching XDP and TC programs, the
#   shaping qdiscs and IFB devices (rtnetlink). Without it: "cannot create tunnel device".
# - CAP_PERFMON: the verifier accepts the programs' pointer arithmetic on packets and map
#   values only with it. Without it: BPF_PROG_LOAD fails with EACCES.
# - CAP_NET_BIND_SERVICE: only for a listen_port or api_listen port below 1024.
# Not needed: CAP_SYS_ADMIN (the agent ran and restarted on its pinned links without it; a
# kernel before 5.8, which has no CAP_BPF/CAP_PERFMON, would need it instead), CAP_NET_RAW (no
# raw IP sockets: netlink only), CAP_SYS_RESOURCE (BPF memory is charged to the cgroup since
# 5.11, no RLIMIT_MEMLOCK), CAP_SYS_MODULE (the kernel loads ifb/sch_htb itself when asked over
# netlink), CAP_DAC_OVERRIDE (the agent owns every file it writes).
CapabilityBoundingSet=CAP_BPF CAP_NET_ADMIN CAP_PERFMON CAP_NET_BIND_SERVICE
NoNewPrivileges=yes

# File system: read-only everywhere except what the agent writes.
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
# /var/lib/capybara (the store, server.key; mode 0700) and /run/capybara (the control socket;
# 0750), made and owned by systemd. Another --data-dir or --api-socket directory needs a
# drop-in with ReadWritePaths=.
StateDirectory=capybara
StateDirectoryMode=0700
RuntimeDirectory=capybara
RuntimeDirectoryMode=0750
# The pinned maps and links (--bpffs under /sys/fs/bpf) and the WireGuard UAPI socket that
# `wg show` reads (/run/wireguard, shared with other WireGuard tools, so made here, outside the
# sandbox, rather than as a RuntimeDirectory= that the stop would remove). /sys stays writable
# on purpose: ProtectKernelTunables= would remount it read-only and pinning on bpffs needs a
# writable mount.
ExecStartPre=+/usr/bin/mkdir -p /run/wireguard
ReadWritePaths=/sys/fs/bpf /run/wireguard
# The configuration and the country database are only read.
ReadOnlyPaths=-{config_dir} -/var/cache/capybara
# Devices: only the TUN clone device.
DevicePolicy=closed
DeviceAllow=/dev/net/tun rw
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
# Sockets: the API and the tunnel (inet), the control socket (unix), rtnetlink (netlink).
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
# The service never makes namespaces (--netns is for tests, not for the unit).
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
SystemCallArchitectures=native
UMask=0077

[Install]
WantedBy=multi-user.target
"#,
        exe = exe.display(),
        config = config.display(),
        config_dir = layout.config_dir.display(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_layout_stays_under_the_prefix() {
        let l = Layout::new(Some(Path::new("/opt/capy")));
        for p in [
            &l.bin,
            &l.man,
            &l.bash,
            &l.zsh,
            &l.fish,
            &l.config_dir,
            &l.unit_dir,
        ] {
            assert!(p.starts_with("/opt/capy"), "{}", p.display());
        }
        assert!(!l.system);
        let unit = unit(&l);
        assert!(unit.contains("ExecStart=/opt/capy/bin/capybara-agent --config /opt/capy/etc/capybara/agent.toml\n"), "{unit}");
        let sys = Layout::new(None);
        assert_eq!(sys.bin, Path::new("/usr/local/bin"));
        assert_eq!(sys.config_file(), Path::new("/etc/capybara/agent.toml"));
        assert_eq!(sys.unit_dir, Path::new("/etc/systemd/system"));
    }

    /// `systemd-analyze verify` on the unit as installed into a temporary prefix (verify wants
    /// the ExecStart binary to exist: an executable stands in for it). Part of the unit tests, so
    /// CI and `cargo xtask test` both run it. The man pages its `Documentation=` names are not
    /// generated here (`--man=no`); the integration test `service_install::` verifies an install
    /// with them, found through `MANPATH`.
    #[test]
    fn the_unit_passes_systemd_analyze_verify() {
        let analyze = Path::new("/usr/bin/systemd-analyze");
        assert!(
            analyze.exists(),
            "systemd-analyze missing (the `systemd` package)"
        );
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(Some(dir.path()));
        let exe = layout.bin.join("capybara-agent");
        write_if_changed(b"#!/bin/sh\nexit 0\n", &exe, 0o755).unwrap();
        let unit_path = layout.unit_dir.join(UNIT_NAME);
        assert!(write_if_changed(unit(&layout).as_bytes(), &unit_path, 0o644).unwrap());
        assert!(
            !write_if_changed(unit(&layout).as_bytes(), &unit_path, 0o644).unwrap(),
            "a second write of the same unit changed it"
        );
        let out = std::process::Command::new(analyze)
            .args(["verify", "--man=no"])
            .arg(&unit_path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "systemd-analyze verify failed:\n{stderr}"
        );
        // verify also passes with warnings: the unit must have none of its own.
        let own: Vec<&str> = stderr.lines().filter(|l| l.contains(UNIT_NAME)).collect();
        assert!(own.is_empty(), "systemd-analyze verify warned:\n{stderr}");
    }

    #[test]
    fn an_edited_config_is_kept_and_the_default_written_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("etc/capybara/agent.toml");
        let mut r = Report::default();
        r.config(b"#default\n", &file).unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"#default\n");
        r.config(b"#default\n", &file).unwrap();
        assert_eq!((r.changed, r.unchanged), (1, 1));
        std::fs::write(&file, "listen_port = 51000\n").unwrap();
        r.config(b"#default v2\n", &file).unwrap();
        assert_eq!(
            std::fs::read_to_string(&file).unwrap(),
            "listen_port = 51000\n"
        );
        assert_eq!(
            std::fs::read(dir.path().join("etc/capybara/agent.toml.new")).unwrap(),
            b"#default v2\n"
        );
    }
}
