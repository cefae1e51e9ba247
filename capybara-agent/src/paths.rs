//! Every filesystem path the agent uses, and the mode each is created with, in one place.
//!
//! | what | default | mode |
//! |---|---|---|
//! | bpffs directory (pinned maps) | `/sys/fs/bpf/capybara` | `0700` ([`BPFFS_DIR_MODE`]) |
//! | pinned map | `<bpffs>/<MAP_NAME>` (names from `capybara_common::maps`) | `0600` (kernel default for pins) |
//! | pinned links | `<bpffs>/links/<prog>_<ifname>` | dir `0700`, pins `0600` |
//! | data directory | `/var/lib/capybara` | `0700` ([`DATA_DIR_MODE`]) |
//! | store (RocksDB) | `<data>/store` | created by RocksDB inside the data directory |
//! | control socket | `/run/capybara/agent.sock` | `0600` ([`SOCKET_MODE`]), dir `0750`; only uid 0 is served |
//! | server private key | `<data>/server.key` | `0600` ([`KEY_FILE_MODE`]) |
//! | WireGuard UAPI socket (`wg show`) | `/var/run/wireguard/<iface>.sock` | `0600` ([`WG_UAPI_SOCKET_MODE`]), dir `0755` |
//! | key sealing kept client keys (`--keep-client-keys`) | `<data>/client-keys.key` | `0600` ([`KEY_FILE_MODE`]) |
//! | country database for `geo block/allow` when `--geoip-db` is not given | `/var/cache/capybara/geoip/geo-whois-asn-country.mmdb` ([`GEOIP_DB`], installed by `cargo xtask setup`; used only if it exists) | read only |
//! | agent configuration file (`--config`; every key is also a flag) | `/etc/capybara/agent.toml` ([`CONFIG_FILE`]; read only if it exists) | written by `cargo xtask install` `0644`, read only by the agent |
//! | backups the agent writes itself (`backup create` without `--output`, `--backup-dir`) | `<data>/backups` ([`backup_dir`]), files `backup-<UTC time>.capy` | dir `0700` ([`BACKUP_DIR_MODE`]), files `0600` ([`KEY_FILE_MODE`]) |
//! | VLESS endpoint's generated certificate (when `--vless-cert`/`--vless-key` are not given) | `<data>/vless.crt` ([`vless_cert_file`]) and its key `<data>/vless.key` ([`vless_key_file`]) | both `0600` ([`KEY_FILE_MODE`]), written by [`crate::fsutil::write_secret`]; made once, kept across restarts (the client configs trust it) |
//! | temporary file of a secret file being written | `<dir>/.<name>.tmp` ([`temp_file`]) | `0600` ([`KEY_FILE_MODE`]) |
//!
//! **Secret files** are the two key files above; they are the only files the agent itself
//! creates that hold a secret. Both are written by one helper, [`crate::fsutil::write_secret`]
//! (temporary file created `0600`, fsync, rename, fsync of the directory: a crash leaves the old
//! file or none, never an empty or partial one), and read by [`crate::fsutil::read_secret`].
//! The rule at start, the same for both:
//!
//! | the file is | server key (`server.key`) | sealing key (`client-keys.key`, only with `--keep-client-keys`) |
//! |---|---|---|
//! | missing | a new key is made and written | a new key is made and written |
//! | empty, short, too long or not base64 of 32 bytes | refused: the agent does not start, the error names the file (a new key would change the server's public key and every client config) | refused: the agent does not start, the error names the file (a new key could not open the kept client keys) |
//! | open to group or others (`mode & 0o077 != 0`) | refused, naming the file, the mode and the fix `chmod 600 FILE` | refused, the same |
//! | a stale `.<name>.tmp` beside it (a crashed write) | ignored; the next write replaces it | ignored; the same |
//!
//! Removing the bpffs directory (`rm -rf /sys/fs/bpf/capybara`) detaches the programs (their links
//! are pinned there) and resets every kernel counter: it is the documented way to reset the
//! dataplane, e.g. after a layout-version change.

use std::path::{Path, PathBuf};

/// Default bpffs directory holding the pinned maps and links.
pub const BPFFS_DIR: &str = "/sys/fs/bpf/capybara";
/// Mode of the bpffs directory and of its `links` subdirectory: only root reads the maps.
pub const BPFFS_DIR_MODE: u32 = 0o700;
/// Name of the subdirectory of the bpffs directory that holds pinned links.
pub const LINKS_SUBDIR: &str = "links";

/// The country database the agent opens when `--geoip-db` is not given and this file exists:
/// where `cargo xtask setup` installs ip-location-db's CC0 `geo-whois-asn-country` database
/// (xtask's `geoip` module; its cache is `/var/cache/capybara` unless `CAPYBARA_CACHE` says
/// otherwise, and `cargo xtask run` then passes the path itself).
pub const GEOIP_DB: &str = "/var/cache/capybara/geoip/geo-whois-asn-country.mmdb";

/// Default data directory (the store lives under it).
pub const DATA_DIR: &str = "/var/lib/capybara";
/// Mode of the data directory: it holds secrets (server key, encrypted TOTP secrets).
pub const DATA_DIR_MODE: u32 = 0o700;

/// Subdirectory of the data directory that holds the backups the agent writes itself.
pub const BACKUP_SUBDIR: &str = "backups";
/// Mode of the backup directory: backups hold the store's secrets.
pub const BACKUP_DIR_MODE: u32 = 0o700;

/// The default backup directory under the data directory `data_dir`.
pub fn backup_dir(data_dir: &Path) -> PathBuf {
    data_dir.join(BACKUP_SUBDIR)
}

/// Creates the backup directory `dir` (and parents) if needed and gives it
/// [`BACKUP_DIR_MODE`].
pub fn ensure_backup_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(BACKUP_DIR_MODE))
}

/// Subdirectory of the data directory that holds the RocksDB database.
pub const STORE_SUBDIR: &str = "store";

/// Creates `dir` (and parents) if needed and gives it [`DATA_DIR_MODE`].
pub fn ensure_data_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(DATA_DIR_MODE))
}

/// The agent's configuration file, read at start when it exists (`--config` names another,
/// which then must exist): `daemon::config_file`.
pub const CONFIG_FILE: &str = "/etc/capybara/agent.toml";

/// Directory of the control socket.
pub const SOCKET_DIR: &str = "/run/capybara";
/// Mode of the socket directory.
pub const SOCKET_DIR_MODE: u32 = 0o750;
/// Default control socket path (the CLI talks to the agent through it).
pub const SOCKET_PATH: &str = "/run/capybara/agent.sock";
/// Mode of the control socket: root only (the agent also checks the peer credentials).
pub const SOCKET_MODE: u32 = 0o600;

/// File name of the server's WireGuard private key inside the data directory.
pub const KEY_FILE_NAME: &str = "server.key";
/// Mode of the server key file.
pub const KEY_FILE_MODE: u32 = 0o600;

/// Directory of the WireGuard userspace control sockets: where `wg` looks for
/// `<iface>.sock` (compiled into wireguard-tools; it has no override, so tests use unique
/// interface names rather than another directory for `wg show`).
pub const WG_UAPI_DIR: &str = "/var/run/wireguard";
/// Mode of [`WG_UAPI_DIR`] (what wireguard-go creates).
pub const WG_UAPI_DIR_MODE: u32 = 0o755;
/// Mode of a UAPI socket: it answers with the private key, so root only.
pub const WG_UAPI_SOCKET_MODE: u32 = 0o600;

/// Path of the UAPI socket of interface `iface` in `dir`.
pub fn uapi_socket(dir: &Path, iface: &str) -> PathBuf {
    dir.join(format!("{iface}.sock"))
}

/// File name of the key that seals kept client private keys, inside the data directory.
pub const CLIENT_KEYS_KEY_FILE_NAME: &str = "client-keys.key";

/// File name of the key that seals MFA secrets (`service::mfa`), inside the data directory.
pub const MFA_KEY_FILE_NAME: &str = "mfa.key";

/// Path of the MFA sealing key under the data directory `data_dir` (mode 0600, the rule of
/// every secret file).
pub fn mfa_key_file(data_dir: &Path) -> PathBuf {
    data_dir.join(MFA_KEY_FILE_NAME)
}

/// Path of the temporary file a secret file `target` is written to before it is renamed over
/// `target`: `.<name>.tmp` in the same directory (a rename is atomic only within one file
/// system).
pub fn temp_file(target: &Path) -> PathBuf {
    let name = target.file_name().unwrap_or(target.as_os_str());
    let mut tmp = std::ffi::OsString::from(".");
    tmp.push(name);
    tmp.push(".tmp");
    target.with_file_name(tmp)
}

/// Path of the client-key sealing key under the data directory `data_dir`.
pub fn client_keys_key_file(data_dir: &Path) -> PathBuf {
    data_dir.join(CLIENT_KEYS_KEY_FILE_NAME)
}

/// File name of the VLESS endpoint's generated certificate (PEM) inside the data directory.
pub const VLESS_CERT_FILE_NAME: &str = "vless.crt";

/// Where the agent mounts the cgroup v2 hierarchy itself when its mount namespace has none
/// (`ip netns exec` remounts `/sys` without it): the proxied sockets' programs attach there
/// (`dataplane::sockets::own_cgroup_or_mount`). The hierarchy is the system's one.
pub fn cgroup2_mount(data_dir: &Path) -> PathBuf {
    data_dir.join("cgroup2")
}
/// File name of the VLESS endpoint's generated private key (PKCS#8 PEM) inside the data
/// directory.
pub const VLESS_KEY_FILE_NAME: &str = "vless.key";

/// Path of the VLESS endpoint's generated certificate under the data directory `data_dir`.
pub fn vless_cert_file(data_dir: &Path) -> PathBuf {
    data_dir.join(VLESS_CERT_FILE_NAME)
}

/// Path of the VLESS endpoint's generated private key under the data directory `data_dir`
/// (mode 0600, the rule of every secret file).
pub fn vless_key_file(data_dir: &Path) -> PathBuf {
    data_dir.join(VLESS_KEY_FILE_NAME)
}

/// Path of the pinned map `name` under the bpffs directory `bpffs`.
pub fn map_pin(bpffs: &Path, name: &str) -> PathBuf {
    bpffs.join(name)
}

/// Directory of pinned links under the bpffs directory `bpffs`.
pub fn links_dir(bpffs: &Path) -> PathBuf {
    bpffs.join(LINKS_SUBDIR)
}

/// Path of the pinned link of program `prog` attached to interface `ifname`.
pub fn link_pin(bpffs: &Path, prog: &str, ifname: &str) -> PathBuf {
    links_dir(bpffs).join(format!("{prog}_{ifname}"))
}

/// Path of the server key file under the data directory `data_dir`.
pub fn key_file(data_dir: &Path) -> PathBuf {
    data_dir.join(KEY_FILE_NAME)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_live_under_the_bpffs_dir() {
        let d = Path::new(BPFFS_DIR);
        assert_eq!(
            map_pin(d, "CAPY_CONFIG"),
            Path::new("/sys/fs/bpf/capybara/CAPY_CONFIG")
        );
        assert_eq!(
            link_pin(d, "xdp_guard", "eth0"),
            Path::new("/sys/fs/bpf/capybara/links/xdp_guard_eth0")
        );
        assert_eq!(
            key_file(Path::new(DATA_DIR)),
            Path::new("/var/lib/capybara/server.key")
        );
        assert_eq!(
            uapi_socket(Path::new(WG_UAPI_DIR), "capy0"),
            Path::new("/var/run/wireguard/capy0.sock")
        );
        assert_eq!(
            temp_file(&key_file(Path::new(DATA_DIR))),
            Path::new("/var/lib/capybara/.server.key.tmp")
        );
        assert_eq!(temp_file(Path::new("k")), Path::new(".k.tmp"));
    }
}
