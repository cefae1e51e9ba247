//! The integration tests of the tests crate, in one binary (one link of RocksDB, aya and tonic
//! instead of one per file). One module per concern; a test is `module::test_name`.
//!
//! - `api_*`: the gRPC API and the `capybara` CLI against an in-process agent (no root);
//!   `api_support` starts it. `design_lines`: every command line of the design document
//!   (`shared/DESIGN-PHASE4.md`) for the features that exist, verbatim, the same way.
//! - `dataplane`, `geo`, `e2e_*`: the agent's dataplane, tunnel and daemon against the real kernel
//!   in network namespaces (root); `e2e_support` opens and attaches the dataplane.
//! - `prog_test_run`: BPF_PROG_TEST_RUN tables of the kernel programs (root).
//! - `logging`: the runtime log filter (installs the process's global subscriber).
//! - `service_install`: `cargo xtask install --prefix` into a temporary directory and
//!   `capybara diagnose` without an agent (no root); `e2e_service` runs the installed agent
//!   with its unit's capabilities and `$NOTIFY_SOCKET`, and diagnose against it (root).
//!
//! `cargo xtask test` runs `prog_test_run::` as its own stage and everything else serially in the
//! `e2e` stage.

mod api_support;
mod e2e_support;

mod api_audit;
mod api_backup;
mod api_blocklist_paging;
mod api_cli;
mod api_connections;
mod api_control_socket;
mod api_expiry;
mod api_geo;
mod api_grpc;
mod api_history;
mod api_listen;
mod api_live;
mod api_metrics;
mod api_mfa;
mod api_mfa_page;
mod api_notify;
mod api_paging;
mod api_policy;
mod api_report_html;
mod api_reports;
mod api_reputation;
mod api_rest;
mod api_schedule;
mod api_templates;
mod api_tls;
mod api_token_user;
mod api_webhooks;
mod dataplane;
mod design_lines;
mod e2e_agent_restart;
mod e2e_audit_retention;
mod e2e_auth_flood;
mod e2e_cluster;
mod e2e_dst_blocklist;
mod e2e_expiry;
mod e2e_first_run;
mod e2e_flows;
mod e2e_gate;
mod e2e_harness;
mod e2e_list_replace;
mod e2e_live;
mod e2e_metrics;
mod e2e_mfa;
mod e2e_mfa_page;
mod e2e_notify;
mod e2e_peer_counters;
mod e2e_policy;
mod e2e_quota;
mod e2e_reputation;
mod e2e_service;
mod e2e_session_history;
mod e2e_shape;
mod e2e_store_durability;
mod e2e_usage_report;
mod e2e_webhook_restart;
mod e2e_wg_dataplane;
mod e2e_wg_tunnel;
mod e2e_xdp_guard;
mod geo;
mod logging;
mod prog_test_run;
mod service_install;
// Issue 22, IP intelligence.
mod api_intel;
mod e2e_intel;
// Issue 23, the benchmark report: its charts rendered by Chromium.
mod bench_report;
// Issue 23, tunnel workers and UDP segmentation offload.
mod e2e_tunnel_workers;
// Issue 24, the VLESS endpoint with Debian's v2ray client.
mod e2e_vless;
// Issue 24, the kernel enforcing a proxied user's sockets.
mod e2e_proxies;
mod e2e_proxy_kernel;
// Issue 24, proxy identities: protocols of users, their ids, client configs.
mod api_proxies;
// Issue 24, the Shadowsocks endpoint against ss-local.
mod e2e_shadowsocks;
