//! `vmwatchd`: the vmwatch daemon.
//!
//! It attaches to lab VMs (or starts them), owns their event rings (one
//! consumer per ring), fans every record out to engines, and serves a local,
//! token-protected HTTP/JSON API that the `vmwatch` CLI uses.
//!
//! - [`registry`]: the watched VMs, the API's subscribers, and the ring filter
//!   each VM gets (the union of what its subscribers and engines want; `none`
//!   when nobody asks, so an unobserved guest pays almost nothing).
//! - [`pump`]: one OS thread per VM that polls its ring, feeds the engines and
//!   notices when QEMU dies.
//! - [`engine`]: the narrow boundary engines implement ([`engine::Engine`]);
//!   the tracer ([`engine::TracerEngine`]) is the first, later issues add the
//!   diffusion tracker and the log vault on the same records.
//! - [`diffusion`], [`diffusion_api`]: the diffusion tracker (one engine
//!   for all VMs, its SQLite history under the state directory) and its routes.
//! - [`logvault`]: the log vault (guest syslog messages from the cpuid
//!   doorbell into tamper-evident per-VM vaults).
//! - [`api`]: the HTTP routes (`/v1/...`), NDJSON event streams.
//! - [`auth`], [`paths`]: the bearer token, the state directory, the pid lock.
//! - [`server`]: binding the unix socket (and optionally loopback TCP), the
//!   `--watch-all` scanner, graceful shutdown.
//!
//! The blocking client the CLI uses lives in `crates/vmwatch/src/daemon_client.rs`
//! (std-only, because `trace_cmd.rs` is also compiled into the hook-plugin
//! test crate); this crate's tests drive the daemon through that same file.

pub mod api;
pub mod auth;
pub mod diffusion;
pub mod diffusion_api;
pub mod engine;
pub mod error;
pub mod forward;
pub mod integrity;
pub mod logvault;
pub mod paths;
pub mod pump;
pub mod registry;
pub mod server;

pub use engine::{Engine, EventSink, Interest, Published, TracerEngine, VmContext};
pub use error::{ApiError, DaemonError, WatchError};
pub use registry::{Registry, Scope};
pub use server::{run, Config};
