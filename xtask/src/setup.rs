//! `cargo xtask setup`: install what a fresh Debian 12 machine lacks, idempotently.
//!
//! Each item is checked before anything is done (`dpkg-query -W`, `rustup component list`,
//! `bpf-linker --version` plus a stamp file, `/proc/self/mounts`), so a second run only looks
//! and says that everything was already there. What is installed where:
//! - Debian packages ([`PACKAGES`]) with `apt-get install -y --no-install-recommends`,
//!   `apt-get update` first, only when one is missing.
//! - `rust-src` and `clippy` for the `nightly` toolchain (build-std and the eBPF clippy),
//!   `clippy` and `rustfmt` for the default one.
//! - bpf-linker [`BPF_LINKER_VERSION`] under `<cache>/tools`, linked against nightly's own
//!   libLLVM through `<cache>/llvm-prefix` (see shared/TOOLCHAIN.md); the stamp
//!   `<cache>/tools/bpf-linker.stamp` records the libLLVM it was built against, so a new nightly
//!   triggers a rebuild.
//! - boringtun-cli [`BORINGTUN_CLI_VERSION`] under `<cache>/tools` (benchmark baseline).
//! - bpffs mounted at `/sys/fs/bpf`.
//! - the Python tools ([`PYTHON_TOOLS`]: schemathesis, standardwebhooks, aiosmtpd) in a virtual
//!   environment at `<cache>/pyenv`, with a stamp of the pins.
//! - Debian's `v2ray.service` disabled and stopped: the package enables and starts it with its
//!   example configuration; tests and benchmarks start their own v2ray processes. The same for
//!   `shadowsocks-libev` and `etcd` (a member on localhost:2379 the tests never use).
//! - the country database for `geo block/allow` (ip-location-db's CC0
//!   `geo-whois-asn-country`, pinned and hash-checked) at `<cache>/geoip/` (`crate::geoip`).
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context as _, Result, bail};
use nix::fcntl::{Flock, FlockArg};

use crate::exec::{self, cmd};
use crate::geoip;

/// Debian packages the build, the tests and the benchmarks use.
pub const PACKAGES: &[&str] = &[
    "bpftool",
    "iperf3",
    "wireguard-tools",
    "wireguard-go",
    "nftables",
    "ipset",
    "iptables",
    "iproute2",
    "iputils-ping",
    // `e2e_live` drives `capybara top` in a real terminal.
    "tmux",
    "protobuf-compiler",
    // google/protobuf/descriptor.proto, which the REST annotations (google/api/annotations.proto)
    // extend.
    "libprotobuf-dev",
    "libclang-dev",
    "librocksdb-dev",
    "pkg-config",
    // The country database download (`crate::geoip`).
    "curl",
    // The Python tools' virtual environment ([`PYTHON_TOOLS`]).
    "python3-venv",
    "ca-certificates",
    // The metrics test: `promtool check metrics` and a real Prometheus server scraping the agent.
    "prometheus",
    // `cargo xtask install`'s checks: `systemd-analyze verify` of the unit, `man -l` of the
    // generated pages.
    "systemd",
    "man-db",
    // The html usage report's test (`report_html`) renders it in headless Chromium and looks at
    // the screenshot; chromium-driver is its WebDriver, for tests that drive a page.
    "chromium",
    "chromium-driver",
    // The MFA e-mail code tests make a throw-away CA and server certificate for the SMTP sink.
    "openssl",
    // Issue 24: the VLESS endpoint's real client (`e2e_vless`; `api_proxies` checks it loads
    // the printed client config) and the reference server of `vless_throughput_vs_v2ray`
    // (v2ray 4.34). Its packaged service is left disabled and stopped ([`packaged_service_off`]).
    "v2ray",
    // Issue 24: `ss-local` (the Shadowsocks client of `e2e_shadowsocks`) and `ss-server` (the
    // baseline of the `shadowsocks_throughput_vs_ssserver` bench). The package's own server
    // service is stopped and disabled ([`packaged_service_off`]): tests start their own.
    "shadowsocks-libev",
    // Issue 25: the cluster's consensus store, three members per test (`etcd`), and `etcdctl`,
    // which the tests ask when the members are healthy. The package's own member is stopped
    // and disabled ([`packaged_service_off`]): tests start their own on a LAN they made.
    "etcd-server",
    "etcd-client",
];

/// Python tools the tests run, pinned, from PyPI into a virtual environment at `<cache>/pyenv`
/// (`python_tools`): schemathesis (the REST mirror against its OpenAPI document) and
/// standardwebhooks (a webhook receiver checking signatures the way receivers do) and aiosmtpd
/// (the local SMTP sink speaking STARTTLS that the MFA e-mail code tests send to).
pub const PYTHON_TOOLS: &[&str] = &[
    "schemathesis==4.32.5",
    "standardwebhooks==1.3.0",
    "aiosmtpd==1.4.6",
];

/// The bpf-linker release that works with aya 0.14 and nightly's LLVM 22.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// boringtun-cli, the userspace WireGuard baseline of the tunnel benchmarks.
const BORINGTUN_CLI_VERSION: &str = "0.7.1";
/// The toolchain that builds the eBPF crate (aya-build runs `rustup run nightly`).
const NIGHTLY: &str = "nightly";
/// Where bpffs is mounted; the agent pins its maps below it.
const BPFFS: &str = "/sys/fs/bpf";
/// The kernel this project is built for (BPF with BTF, TCX links).
const MIN_KERNEL: (u32, u32) = (6, 6);

/// Flags of `cargo xtask setup`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// What a run found and what it did, printed at the end.
#[derive(Debug, Default)]
struct Report {
    /// Items that were already in place.
    present: Vec<String>,
    /// Items this run installed, mounted or fixed.
    done: Vec<String>,
}

impl Report {
    fn present(&mut self, what: impl Into<String>) {
        let what = what.into();
        eprintln!("setup: ok: {what}");
        self.present.push(what);
    }

    fn done(&mut self, what: impl Into<String>) {
        let what = what.into();
        eprintln!("setup: done: {what}");
        self.done.push(what);
    }
}

/// Entry point of `cargo xtask setup` (also the first step of `test`, `run` and `bench`).
pub fn run(_args: &Args) -> Result<()> {
    let started = Instant::now();
    let cache = exec::cache_dir();
    let mut report = Report::default();

    check_kernel(&mut report);
    let _lock = lock_cache(&cache)?;
    debian_packages(&mut report)?;
    packaged_service_off(&mut report, "shadowsocks-libev")?;
    packaged_service_off(&mut report, "v2ray")?;
    packaged_service_off(&mut report, "etcd")?;
    rust_components(&mut report)?;
    bpf_linker(&cache, &mut report)?;
    boringtun_cli(&mut report)?;
    bpffs(&mut report)?;
    geoip_db(&cache, &mut report)?;
    python_tools(&cache, &mut report)?;
    nextest(&mut report);

    let elapsed = started.elapsed().as_secs_f32();
    if report.done.is_empty() {
        eprintln!(
            "setup: nothing to do, all {} items were already there ({elapsed:.1} s)",
            report.present.len()
        );
    } else {
        eprintln!(
            "setup: did {} ({}), {} already there ({elapsed:.1} s)",
            report.done.len(),
            report.done.join("; "),
            report.present.len()
        );
    }
    Ok(())
}

/// Fail early, before any change, when a change is needed and we are not root.
fn need_root(what: &str) -> Result<()> {
    if !exec::is_root() {
        bail!(
            "setup needs root to {what}; run it again as root (e.g. `sudo -E cargo xtask setup`)"
        );
    }
    Ok(())
}

/// Report the kernel release and BTF; too old a kernel is a warning, not an error.
fn check_kernel(report: &mut Report) {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let release = release.trim();
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>());
    let version = match (numbers.next(), numbers.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => Some((major, minor)),
        _ => None,
    };
    let btf = Path::new("/sys/kernel/btf/vmlinux").exists();
    match version {
        Some(version) if version >= MIN_KERNEL && btf => {
            report.present(format!("kernel {release} with BTF"));
        }
        _ => eprintln!(
            "setup: warning: kernel {release} (BTF {}): Capybara needs Linux >= {}.{} with BPF \
             and BTF (/sys/kernel/btf/vmlinux)",
            if btf { "present" } else { "missing" },
            MIN_KERNEL.0,
            MIN_KERNEL.1
        ),
    }
}

/// The country database in the cache (`crate::geoip`).
fn geoip_db(cache: &Path, report: &mut Report) -> Result<()> {
    if geoip::is_installed(cache) {
        report.present(format!("country database {}", geoip::VERSION));
        return Ok(());
    }
    need_root("download the country database")?;
    if let geoip::Outcome::Fetched {
        path,
        db_bytes,
        download_secs,
        ..
    } = geoip::ensure(cache)?
    {
        report.done(format!(
            "country database {} at {} ({db_bytes} bytes, downloaded in {download_secs:.1} s)",
            geoip::VERSION,
            path.display()
        ));
    }
    Ok(())
}

/// [`PYTHON_TOOLS`] in `<cache>/pyenv`; the stamp `<cache>/pyenv/capybara.stamp` lists what was
/// installed, so a new pin reinstalls.
fn python_tools(cache: &Path, report: &mut Report) -> Result<()> {
    let venv = cache.join("pyenv");
    let stamp = venv.join("capybara.stamp");
    let wanted = PYTHON_TOOLS.join(" ");
    if fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == wanted) {
        report.present(format!("python tools ({wanted})"));
        return Ok(());
    }
    need_root("install the python tools")?;
    if !venv.join("bin/pip").exists() {
        exec::run(cmd("python3").args(["-m", "venv"]).arg(&venv))?;
    }
    exec::run(
        cmd(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .args(PYTHON_TOOLS),
    )?;
    fs::write(&stamp, &wanted).with_context(|| format!("write {}", stamp.display()))?;
    report.done(format!("python tools ({wanted}) in {}", venv.display()));
    Ok(())
}

/// Serialise setups (two `cargo xtask test` at once must not both build bpf-linker).
fn lock_cache(cache: &Path) -> Result<Option<Flock<File>>> {
    if !exec::is_root() {
        // Without root setup can only look; it fails before the first change.
        return Ok(None);
    }
    fs::create_dir_all(cache).with_context(|| format!("create cache dir {}", cache.display()))?;
    let path = cache.join("setup.lock");
    let file = File::create(&path).with_context(|| format!("open {}", path.display()))?;
    let file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => return Ok(Some(lock)),
        Err((file, nix::errno::Errno::EWOULDBLOCK)) => file,
        Err((_, errno)) => return Err(errno).with_context(|| format!("lock {}", path.display())),
    };
    eprintln!(
        "setup: waiting for another setup to finish (lock {})",
        path.display()
    );
    let lock = Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, errno)| errno)
        .with_context(|| format!("lock {}", path.display()))?;
    Ok(Some(lock))
}

/// Install the missing [`PACKAGES`]; `apt-get update` only when something is missing.
fn debian_packages(report: &mut Report) -> Result<()> {
    // Exits 1 when a name is unknown to dpkg; the installed ones are still listed.
    let out = exec::output_unchecked(
        cmd("dpkg-query")
            .arg("-W")
            .arg(r"-f=${Package}\t${db:Status-Abbrev}\n")
            .args(PACKAGES),
    )
    .context("dpkg-query (setup supports Debian 12; install the packages by hand elsewhere)")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let installed: Vec<&str> = stdout
        .lines()
        .filter_map(|line| line.split_once('\t'))
        .filter(|(_, status)| status.starts_with("ii"))
        .map(|(name, _)| name)
        .collect();
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|name| !installed.contains(name))
        .collect();
    if missing.is_empty() {
        report.present(format!("{} Debian packages", PACKAGES.len()));
        return Ok(());
    }
    need_root("install Debian packages")?;
    exec::run(
        cmd("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    exec::run(
        cmd("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    report.done(format!("apt-get install {}", missing.join(" ")));
    if missing.len() < PACKAGES.len() {
        report.present(format!(
            "{} other Debian packages",
            PACKAGES.len() - missing.len()
        ));
    }
    Ok(())
}

/// Debian's `shadowsocks-libev`, `v2ray` and `etcd-server` packages enable and start their own
/// server (a Shadowsocks server on port 8388 with a generated password; v2ray with its example
/// configuration; an etcd member on localhost): the tests and benchmarks start their own, so the
/// packaged `name` service is stopped and kept from starting at boot — systemd's unit when
/// systemd runs, the SysV script's start links otherwise (containers).
fn packaged_service_off(report: &mut Report, name: &str) -> Result<()> {
    let unit = format!("{name}.service");
    if Path::new("/run/systemd/system").is_dir() {
        let query = |what: &str| {
            exec::output_unchecked(cmd("systemctl").args([what, "--quiet", unit.as_str()]))
                .map(|out| out.status.success())
        };
        if !query("is-enabled")? && !query("is-active")? {
            report.present(format!("{unit} disabled and stopped"));
            return Ok(());
        }
        need_root(&format!("disable {unit}"))?;
        exec::run(cmd("systemctl").args(["disable", "--now", unit.as_str()]))?;
        report.done(format!("disabled and stopped {unit}"));
        return Ok(());
    }
    let script = Path::new("/etc/init.d").join(name);
    let start_links = (0..=6).any(|level| {
        fs::read_dir(format!("/etc/rc{level}.d")).is_ok_and(|dir| {
            dir.flatten().any(|e| {
                let file = e.file_name();
                let file = file.to_string_lossy();
                file.starts_with('S') && file.ends_with(name)
            })
        })
    });
    if !script.exists() || !start_links {
        report.present(format!("{name}'s SysV service disabled"));
        return Ok(());
    }
    need_root(&format!("disable the {name} service"))?;
    exec::run(cmd("update-rc.d").args([name, "disable"]))?;
    // Stopped only if it runs: LSB `status` exits 0 then. Some scripts' `stop` fails on a
    // server that does not run (v2ray's exits 1 on a fresh machine, where it never started).
    let running = exec::output_unchecked(cmd(&script).arg("status"))?
        .status
        .success();
    if running {
        exec::run(cmd(&script).arg("stop"))?;
    }
    report.done(if running {
        format!("disabled and stopped {name}'s SysV service")
    } else {
        format!("disabled {name}'s SysV service (it was not running)")
    });
    Ok(())
}

/// Components of a rustup toolchain (`None`: the active one) that are installed.
fn installed_components(toolchain: Option<&str>) -> Result<Vec<String>> {
    let mut command = cmd("rustup");
    command.args(["component", "list", "--installed"]);
    if let Some(toolchain) = toolchain {
        command.args(["--toolchain", toolchain]);
    }
    let out = exec::output(&mut command)?;
    // Lines look like `rust-src` or `clippy-x86_64-unknown-linux-gnu`.
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect())
}

/// Add `wanted` components to `toolchain` (`None`: the active one) when missing.
fn components(toolchain: Option<&str>, wanted: &[&str], report: &mut Report) -> Result<()> {
    let installed = installed_components(toolchain)?;
    let has = |name: &str| {
        installed
            .iter()
            .any(|line| line == name || line.starts_with(&format!("{name}-")))
    };
    let missing: Vec<&str> = wanted.iter().copied().filter(|name| !has(name)).collect();
    let label = toolchain.unwrap_or("default toolchain");
    if missing.is_empty() {
        report.present(format!("{label}: {}", wanted.join(", ")));
        return Ok(());
    }
    let mut command = cmd("rustup");
    command.args(["component", "add"]).args(&missing);
    if let Some(toolchain) = toolchain {
        command.args(["--toolchain", toolchain]);
    }
    exec::run(&mut command)?;
    report.done(format!(
        "{label}: rustup component add {}",
        missing.join(" ")
    ));
    Ok(())
}

/// The nightly toolchain must come with the machine (its LLVM is what bpf-linker links to).
fn rust_components(report: &mut Report) -> Result<()> {
    let out = exec::output(cmd("rustup").args(["toolchain", "list"]))?;
    let toolchains = String::from_utf8_lossy(&out.stdout);
    if !toolchains
        .lines()
        .any(|line| line.starts_with(&format!("{NIGHTLY}-")))
    {
        bail!(
            "the `{NIGHTLY}` toolchain is not installed; it must come with the machine (its LLVM \
             22 is what bpf-linker links against, see shared/TOOLCHAIN.md)"
        );
    }
    components(Some(NIGHTLY), &["rust-src", "clippy"], report)?;
    components(None, &["clippy", "rustfmt"], report)
}

/// The versioned libLLVM shared library of the nightly toolchain, e.g.
/// `…/lib/libLLVM.so.22.1-rust-1.97.0-nightly`.
fn nightly_libllvm() -> Result<PathBuf> {
    let out = exec::output(cmd("rustc").args([&format!("+{NIGHTLY}"), "--print", "sysroot"]))?;
    let sysroot = String::from_utf8(out.stdout).context("non-UTF-8 nightly sysroot")?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let mut found = Vec::new();
    for entry in fs::read_dir(&lib).with_context(|| format!("read {}", lib.display()))? {
        let name = entry?.file_name();
        if name.to_string_lossy().starts_with("libLLVM.so.") {
            found.push(lib.join(name));
        }
    }
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!(
            "no libLLVM.so.* in {}: cannot build bpf-linker against it",
            lib.display()
        ),
        many => bail!("several libLLVM.so.* in {}: {many:?}", lib.display()),
    }
}

/// Point `link` at `target`, replacing whatever is there; true when it changed anything.
fn ensure_symlink(target: &Path, link: &Path) -> Result<bool> {
    if fs::read_link(link).is_ok_and(|current| current == target) {
        return Ok(false);
    }
    need_root("write the LLVM prefix")?;
    eprintln!("$ ln -sfn {} {}", target.display(), link.display());
    if fs::symlink_metadata(link).is_ok() {
        fs::remove_file(link).with_context(|| format!("remove {}", link.display()))?;
    }
    std::os::unix::fs::symlink(target, link)
        .with_context(|| format!("symlink {} -> {}", link.display(), target.display()))?;
    Ok(true)
}

/// First line of `program --version`, or `None` when it is absent or does not run.
fn version_of(program: &Path) -> Option<String> {
    if !program.exists() {
        return None;
    }
    let out = exec::output_unchecked(cmd(program).arg("--version")).ok()?;
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_owned()
    })
}

/// bpf-linker built with nightly against nightly's own libLLVM (shared/TOOLCHAIN.md).
fn bpf_linker(cache: &Path, report: &mut Report) -> Result<()> {
    let libllvm = nightly_libllvm()?;
    let lib_name = libllvm
        .file_name()
        .context("libLLVM path")?
        .to_string_lossy()
        .into_owned();
    // `libLLVM.so.22.1-rust-…` → LLVM 22 → cargo feature `llvm-22`.
    let major = lib_name
        .trim_start_matches("libLLVM.so.")
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .filter(|major| !major.is_empty())
        .with_context(|| format!("no LLVM major version in {lib_name}"))?;
    let feature = format!("llvm-{major}");

    let prefix = cache.join("llvm-prefix");
    let prefix_lib = prefix.join("lib");
    if !prefix_lib.is_dir() {
        need_root("create the LLVM prefix")?;
        fs::create_dir_all(&prefix_lib)
            .with_context(|| format!("create {}", prefix_lib.display()))?;
    }
    let mut relinked = ensure_symlink(&libllvm, &prefix_lib.join("libLLVM.so"))?;
    relinked |= ensure_symlink(&libllvm, &prefix_lib.join(&lib_name))?;
    if relinked {
        report.done(format!("LLVM prefix {} -> {lib_name}", prefix.display()));
    }

    let root = exec::tools_root();
    let binary = root.join("bin/bpf-linker");
    let stamp = root.join("bpf-linker.stamp");
    let wanted_stamp = format!("bpf-linker {BPF_LINKER_VERSION} {feature} {lib_name}\n");
    let version = version_of(&binary);
    let stamped = fs::read_to_string(&stamp).ok();
    let wanted_version = format!("bpf-linker {BPF_LINKER_VERSION}");
    if version.as_deref() == Some(wanted_version.as_str())
        && stamped.as_deref() == Some(wanted_stamp.as_str())
    {
        report.present(format!("{wanted_version} ({feature}, {lib_name})"));
        return Ok(());
    }
    let why = match (&version, &stamped) {
        (None, _) => "not installed or does not run".to_owned(),
        (Some(v), _) if *v != wanted_version => format!("found `{v}`"),
        (_, None) => format!("no stamp {}", stamp.display()),
        (_, Some(s)) => format!("built for `{}`, nightly now has {lib_name}", s.trim()),
    };
    eprintln!("setup: bpf-linker: (re)installing: {why}");
    need_root("install bpf-linker")?;
    exec::run(
        cmd("cargo")
            .arg(format!("+{NIGHTLY}"))
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
            ])
            .args([
                "--no-default-features",
                "--features",
                &feature,
                "--force",
                "--root",
            ])
            .arg(&root)
            .arg("--target-dir")
            .arg(cache.join("build/bpf-linker"))
            .env("LLVM_PREFIX", &prefix),
    )?;
    let installed = version_of(&binary);
    if installed.as_deref() != Some(wanted_version.as_str()) {
        bail!(
            "after installing, `{} --version` says {installed:?}",
            binary.display()
        );
    }
    fs::write(&stamp, &wanted_stamp).with_context(|| format!("write {}", stamp.display()))?;
    report.done(format!(
        "installed {wanted_version} ({feature}, {lib_name}) in {}",
        root.display()
    ));
    Ok(())
}

/// boringtun-cli, the userspace WireGuard baseline for the benchmarks.
fn boringtun_cli(report: &mut Report) -> Result<()> {
    let root = exec::tools_root();
    let binary = root.join("bin/boringtun-cli");
    let version = version_of(&binary);
    let wanted = format!("boringtun {BORINGTUN_CLI_VERSION}");
    if version.as_deref() == Some(wanted.as_str()) {
        report.present(format!("boringtun-cli {BORINGTUN_CLI_VERSION}"));
        return Ok(());
    }
    eprintln!("setup: boringtun-cli: installing (found {version:?}, want `{wanted}`)");
    need_root("install boringtun-cli")?;
    exec::run(
        cmd("cargo")
            .args([
                "install",
                "boringtun-cli",
                "--version",
                BORINGTUN_CLI_VERSION,
                "--locked",
            ])
            .args(["--force", "--root"])
            .arg(&root)
            .arg("--target-dir")
            .arg(exec::cache_dir().join("build/boringtun-cli")),
    )?;
    let installed = version_of(&binary);
    if installed.as_deref() != Some(wanted.as_str()) {
        bail!(
            "after installing, `{} --version` says {installed:?}",
            binary.display()
        );
    }
    report.done(format!(
        "installed boringtun-cli {BORINGTUN_CLI_VERSION} in {}",
        root.display()
    ));
    Ok(())
}

/// Mount bpffs at [`BPFFS`] unless it already is.
fn bpffs(report: &mut Report) -> Result<()> {
    let mounts = fs::read_to_string("/proc/self/mounts").context("read /proc/self/mounts")?;
    let mounted = mounts.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.get(1) == Some(&BPFFS) && fields.get(2) == Some(&"bpf")
    });
    if mounted {
        report.present(format!("bpffs at {BPFFS}"));
        return Ok(());
    }
    need_root("mount bpffs")?;
    exec::run(cmd("mount").args(["-t", "bpf", "bpf", BPFFS]))?;
    report.done(format!("mounted bpffs at {BPFFS}"));
    Ok(())
}

/// cargo-nextest is optional: `cargo xtask test` falls back to `cargo test` without it.
fn nextest(report: &mut Report) {
    match exec::output_unchecked(cmd("cargo").args(["nextest", "--version"])) {
        Ok(out) if out.status.success() => {
            let version = String::from_utf8_lossy(&out.stdout);
            report.present(
                version
                    .lines()
                    .next()
                    .unwrap_or("cargo-nextest")
                    .trim()
                    .to_owned(),
            );
        }
        _ => eprintln!("setup: note: cargo-nextest not found; `cargo xtask test` uses cargo test"),
    }
}
