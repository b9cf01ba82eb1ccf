#![doc = include_str!("../README.md")]

pub mod api;
pub mod broker;
pub mod cli;
pub mod config;
pub mod credentials;
pub mod downlink;
pub mod http;
pub mod ingest;
pub mod metrics;
pub mod mqtt_auth;
pub mod ota;
pub mod provisioning;
pub mod server;
pub mod sessions;
pub mod store;

pub use config::Config;
pub use server::Server;
