//! The gRPC front: the `billing.v1` API for the frontend (`api`), who may call it (`caller`), how
//! billing errors become gRPC statuses with `google.rpc` details (`status`), request metrics and
//! tracing (`metrics`), the server with health and reflection (`server`), and the `auth.v1`
//! client the outbox delivers role changes through (`auth_target`).
//!
//! The `.proto` files live in `billing-tasks/proto/` and are compiled by `build.rs` with protox,
//! so no `protoc` is needed.

pub mod api;
pub mod auth_target;
pub mod caller;
pub mod config;
pub mod metrics;
pub mod server;
pub mod status;

/// The `tonic` the generated clients are built on, so a client (the demo, another back-end in
/// this workspace) uses `billing_tasks::grpc::tonic::Request` without a matching dependency.
pub use tonic;

/// Generated code: messages, the server traits and the clients.
#[allow(
    missing_docs,
    missing_debug_implementations,
    clippy::all,
    clippy::pedantic
)]
pub mod proto {
    /// `billing.v1`.
    pub mod billing {
        /// `billing.v1`.
        pub mod v1 {
            tonic::include_proto!("billing.v1");
        }
    }
    /// `auth.v1`.
    pub mod auth {
        /// `auth.v1`.
        pub mod v1 {
            tonic::include_proto!("auth.v1");
        }
    }
}

/// The encoded file descriptor set of both packages, served by reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));

/// A protobuf timestamp from a UTC time.
pub fn timestamp(t: chrono::DateTime<chrono::Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}
