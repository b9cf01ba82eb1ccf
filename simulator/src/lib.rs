#![doc = include_str!("../README.md")]

pub mod activity;
pub mod api;
pub mod clock;
pub mod engine;
pub mod fleet;
pub mod mqtt;
pub mod ota;
pub mod power;
pub mod report;
pub mod rng;
pub mod scenario;
pub mod stats;
pub mod trap;

pub use engine::{EngineError, Options, Simulation, Target};
pub use report::Report;
pub use scenario::{Scenario, ScenarioError};
