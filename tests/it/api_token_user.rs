//! Tokens restricted to one user (`api token create --user alice`): over TCP such a token may
//! read and change alice (her record, devices, stats, kick) within its scope, and is refused
//! (`PERMISSION_DENIED`, naming its user) for anything else: another user, every list of users,
//! connections or sessions, account changes, tokens, policy. The restriction is stored with the token,
//! listed and audited; a restriction to a user that does not exist, or a bad name, makes no token.

use std::path::PathBuf;

use capybara_agent::service::domain::Scope;
use capybara_tests::agent_proc::agent_crate_binary;
use tonic::Code;

use crate::api_support::{Cli, TestApi, refused};

fn start() -> (tokio::runtime::Runtime, TestApi, PathBuf) {
    let bin = agent_crate_binary("capybara");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = rt.block_on(TestApi::start(false));
    (rt, api, bin)
}

#[test]
fn a_token_restricted_to_a_user_acts_on_that_user_only() {
    let (rt, api, bin) = start();
    let local = Cli::socket(&bin, &api.socket);
    local.ok(&["user", "add", "alice", "--no-qr"]);
    local.ok(&["user", "add", "bob", "--no-qr"]);

    // Bad input makes no token.
    let tokens_before = local.json(&["api", "token", "list"]);
    local.fails(
        2,
        &["api", "token", "create", "--user", "Not A Name"],
        "user: ",
    );
    local.fails(1, &["api", "token", "create", "--user", "nobody"], "nobody");
    assert_eq!(local.json(&["api", "token", "list"]), tokens_before);

    let made = local.json(&[
        "api",
        "token",
        "create",
        "--scope",
        "write",
        "--name",
        "alice-app",
        "--user",
        "alice",
    ]);
    assert_eq!(made["token"]["user"], "alice");
    let secret = made["secret"].as_str().unwrap().to_owned();
    let id = made["token"]["id"].as_str().unwrap().to_owned();
    // Listed (JSON and the table's USER column) and audited.
    let list = local.json(&["api", "token", "list"]);
    assert_eq!(list[0]["user"], "alice");
    let table = local.ok(&["api", "token", "list"]);
    let row = table.lines().find(|l| l.starts_with(&id)).unwrap();
    assert!(row.trim_end().ends_with(" alice"), "{row}");
    let audit = local.json(&["history", "audit"]);
    let rec = audit
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["action"] == "token.create")
        .expect("token.create audited");
    assert_eq!(rec["after"]["user"], "alice", "{rec}");

    let c = rt.block_on(api.tcp_client(Some(&secret)));
    // Allowed: alice.
    let alice = rt.block_on(c.get_user("alice")).unwrap();
    assert_eq!(alice.user.name.as_str(), "alice");
    rt.block_on(c.add_peer("alice", "phone")).unwrap();
    rt.block_on(c.stats("alice")).unwrap();
    rt.block_on(c.kick("alice")).unwrap();
    rt.block_on(c.remove_peer("alice", "phone")).unwrap();

    // Refused: another user, every user, account changes, tokens, policy.
    let (code, m) = refused(rt.block_on(c.get_user("bob")));
    assert_eq!(code, Code::PermissionDenied);
    assert_eq!(
        m,
        "this token is restricted to user alice; bob is another user"
    );
    let other = [
        refused(rt.block_on(c.add_peer("bob", "phone"))),
        refused(rt.block_on(c.kick("bob"))),
        refused(rt.block_on(c.stats("bob"))),
    ];
    for (code, m) in other {
        assert_eq!(code, Code::PermissionDenied, "{m}");
        assert!(m.contains("bob is another user"), "{m}");
    }
    let everyone = [
        refused(rt.block_on(c.list_users())),
        refused(rt.block_on(c.stats(""))),
        refused(rt.block_on(c.connections())),
        refused(rt.block_on(c.add_user("carol", "", 0))),
        refused(rt.block_on(c.remove_user("alice"))),
        refused(rt.block_on(c.expire_user("alice", 1))),
        refused(rt.block_on(c.renew_user("alice", 0))),
        refused(rt.block_on(c.get_limits("alice"))),
    ];
    for (code, m) in everyone {
        assert_eq!(code, Code::PermissionDenied, "{m}");
        assert!(
            m.starts_with("this token is restricted to user alice: "),
            "{m}"
        );
    }
    // The scope still holds: a key needs admin.
    let (code, m) = refused(rt.block_on(c.user_config("alice", "", false)));
    assert_eq!(code, Code::PermissionDenied);
    assert!(m.contains("needs scope admin"), "{m}");
    // Nothing of bob changed; the CLI says why on one line.
    assert_eq!(
        local.json(&["user", "show", "bob"])["peers"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let tcp = Cli::tcp(&bin, &api, &secret);
    tcp.fails(1, &["user", "list"], "restricted to user alice");
    tcp.ok(&["user", "show", "alice"]);
    // Session history: alice's sessions only (and so no auth attempts, which belong to no one).
    tcp.ok(&["history", "show", "alice"]);
    tcp.fails(1, &["history", "show"], "restricted to user alice");
    tcp.fails(1, &["history", "show", "bob"], "bob is another user");

    // An unrestricted token of the same scope is not affected.
    let w = rt.block_on(api.tcp_client(Some(&api.token(Scope::Write))));
    assert_eq!(rt.block_on(w.list_users()).unwrap().len(), 2);
}
