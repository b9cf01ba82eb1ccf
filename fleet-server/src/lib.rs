#![doc = include_str!("../README.md")]

pub mod broker;
pub mod config;
pub mod store;
