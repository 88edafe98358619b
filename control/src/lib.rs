//! Coordination for a libmeshvpn mesh: the control server's state (nodes,
//! join keys, routes, policy) and the policy language compiled into the
//! engine's packet filter.
//!
//! Layering: this crate sits above `meshvpn-engine` and uses it; the engine
//! never depends on it. What travels to the data path (a compiled packet
//! filter, peers from the network map) is expressed in the engine's own
//! types, so the data path stays free of policy syntax and of the store.
#![deny(unsafe_code)]

pub mod admin;
pub mod apply;
pub mod client;
pub mod join;
pub mod keys;
pub mod node;
pub mod policy;
pub mod proto;
pub mod routes;
pub mod server;
pub mod store;

pub use keys::{JoinError, JoinKeyRecord, KeyOptions, NewKey};
pub use node::{AddressPlan, NodeRecord, NodeRequest};
pub use policy::{compile, MeshNode, Policy, PolicyError};
pub use routes::{Approver, Conflict, RouteError, RouteStatus};
pub use store::{RedeemError, SqliteStore, Store, StoreConfig, StoreError};
