//! The control socket refuses every uid but root by its peer credentials (`SO_PEERCRED`), not
//! by the socket file's mode (issue 19): the `capybara` CLI is run as a real other user (uid and
//! gid 65534, no supplementary groups, by `setpriv`) against an in-process agent whose socket
//! file and directories the test opens to everyone, so only the server's check can refuse it.
//! Needs root (to change uid); no network namespace, no BPF.

use std::{os::unix::fs::PermissionsExt as _, path::Path, process::Command};

use capybara_tests::agent_proc::agent_crate_binary;

use crate::api_support::{Cli, Out, TestApi};

/// The uid (and gid) of the other user: `nobody` on Debian, whether or not it is in passwd.
const OTHER_UID: u32 = 65534;

/// Runs `bin --socket socket args…` as [`OTHER_UID`].
fn run_as_other(bin: &Path, socket: &Path, args: &[&str]) -> Out {
    let o = Command::new("setpriv")
        .arg(format!("--reuid={OTHER_UID}"))
        .arg(format!("--regid={OTHER_UID}"))
        .arg("--clear-groups")
        .arg(bin)
        .arg("--socket")
        .arg(socket)
        .args(args)
        .current_dir("/")
        .env_remove("CAPYBARA_TOKEN")
        .env_remove("CAPYBARA_ENDPOINT")
        .output()
        .expect("run setpriv (util-linux)");
    Out {
        code: o.status.code().expect("exit code"),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

#[test]
fn a_non_root_uid_on_an_open_control_socket_is_refused_and_changes_nothing() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test runs the CLI as uid {OTHER_UID}: run it as root"
    );
    let bin = agent_crate_binary("capybara");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = rt.block_on(TestApi::start(false));
    let root = Cli::socket(&bin, &api.socket);
    root.ok(&["user", "add", "alice"]);

    // Open the way to the socket for everyone: the file mode no longer refuses anybody.
    let open = |p: &Path, mode| std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode));
    open(api.dir.path(), 0o755).unwrap();
    open(api.socket.parent().unwrap(), 0o755).unwrap();
    open(&api.socket, 0o666).unwrap();
    // The binary itself must be runnable by the other user (the target dir is world-readable).
    let probe = run_as_other(&bin, &api.socket, &["--version"]);
    assert_eq!(
        probe.code, 0,
        "the CLI does not run as uid {OTHER_UID}: {}",
        probe.stderr
    );

    let audit_before = api.svc.core.audit_records(None, 1000).unwrap().len();
    let cases: [&[&str]; 4] = [
        &["user", "list"],
        &["user", "add", "mallory"],
        &["user", "remove", "alice"],
        &[
            "api", "token", "create", "--scope", "admin", "--name", "stolen",
        ],
    ];
    for args in cases {
        let o = run_as_other(&bin, &api.socket, args);
        assert_eq!(
            o.code, 1,
            "capybara {args:?} as uid {OTHER_UID}: {}{}",
            o.stdout, o.stderr
        );
        assert!(o.stdout.is_empty(), "{args:?} printed {:?}", o.stdout);
        assert_eq!(o.stderr.lines().count(), 1, "one line: {:?}", o.stderr);
        assert!(
            o.stderr.starts_with("error: ")
                && o.stderr.contains(&format!(
                    "uid {OTHER_UID} is not allowed on the control socket"
                ))
                && o.stderr.contains("run as root"),
            "{args:?}: {:?}",
            o.stderr
        );
    }

    // Nothing changed: the same users, no new token, no audit record.
    let users: Vec<String> = api
        .svc
        .users
        .list_users()
        .unwrap()
        .into_iter()
        .map(|d| d.user.name.to_string())
        .collect();
    assert_eq!(users, ["alice"]);
    assert!(api.svc.tokens.list_tokens().unwrap().is_empty());
    assert_eq!(
        api.svc.core.audit_records(None, 1000).unwrap().len(),
        audit_before
    );

    // Root on the same socket still works.
    assert!(root.ok(&["user", "list"]).contains("alice"));
    root.ok(&["user", "add", "bob"]);
    rt.block_on(api.stop());
}
