#![doc = include_str!("../README.md")]
#![no_std]
#![cfg_attr(not(test), forbid(unsafe_code))]

#[cfg(test)]
extern crate std;

pub mod backoff;
pub mod ota;
pub mod protocol;
pub mod provision;
pub mod queue;
pub mod seal;
pub mod signature;
pub mod topic;

pub use protocol::PROTOCOL_VERSION;
pub use topic::DeviceId;
