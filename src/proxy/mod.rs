//! The data plane: listeners, connections, the forwarding path, upstream clients, headers, TLS
//! and WebSocket tunnels. Never depends on Kubernetes.

pub mod body;
mod caching;
pub mod conn;
pub mod error;
pub mod h1;
pub mod handler;
pub mod headers;
pub mod listener;
pub mod pool;
mod recv;
mod send;
pub mod server;
pub mod tls;
pub mod websocket;
