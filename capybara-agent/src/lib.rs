//! The Capybara agent: the daemon `capybara-agent` and the modules it is made of.
//!
//! One module owns each outside thing (see ARCHITECTURE.md for the invariants):
//!
//! - [`dataplane`]: loading, attaching and pinning the kernel programs; typed map access. The
//!   only code that calls bpf(2).
//! - [`blocklist`]: named lists, their validation and their compilation to the kernel layout
//!   (pure).
//! - [`geo`]: MaxMind DB → per-country CIDR lists; the `.mmdb` writer for fixtures (pure).
//! - [`tunnel`]: the WireGuard interface: TUN device, boringtun sessions, peers, events, UAPI.
//! - [`store`]: RocksDB, the only storage code.
//! - [`api`]: the gRPC server and client and the proto ↔ domain conversions, the only code that
//!   knows protobuf.
//! - [`cli`]: the `capybara` command line, the only code that prints tables.
//! - [`service`]: operations that combine the modules above, in domain types.
//! - [`daemon`]: start-up, run, shutdown.
//! - [`scheduler`]: scheduled tasks wired: the runner, and their commands run by the CLI's own
//!   code in-process against the agent's API.
//! - [`metrics`]: Prometheus metrics (`GET /metrics`), read through the service at each scrape.
//! - [`logging`]: the log subscriber and its runtime-changeable filter.
//! - [`net`], [`units`], [`paths`]: validated network types and quantities (rates); every
//!   filesystem path and its mode.
//! - [`verify`]: the MFA verification page on the tunnel address (HTTP server, HTML) and the
//!   one-time-code channels (SMTP with STARTTLS, an SMS gateway webhook).
//! - [`fsutil`]: secret files written atomically and durably (0600 from the start) and read
//!   back only with a safe mode.
pub mod api;
pub mod blocklist;
pub mod cli;
pub mod cluster;
pub mod daemon;
pub mod dataplane;
pub mod fsutil;
pub mod geo;
pub mod logging;
pub mod metrics;
pub mod net;
pub mod paths;
pub mod proxy;
pub mod scheduler;
pub mod service;
pub mod store;
pub mod tunnel;
pub mod units;
pub mod verify;
