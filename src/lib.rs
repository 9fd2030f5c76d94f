//! fleetwatch: keeps the live state of a fleet of devices and raises alarms about them.
//!
//! Data flows one way: ingest ([`ingest`]: RabbitMQ; [`http`]: `POST /api/readings`) → the
//! [`engine`] routes each reading to its device's actor ([`actors`]) → the pure domain model
//! (`fleetwatch-domain`) decides which events it causes → the [`store`] appends them durably →
//! [`live`] pushes them to browsers. [`rules`] keeps the zones and ranges; [`config`] the settings;
//! [`app`] wires it all together. [`decode`] reads stored events back for all of them and for
//! [`verify`], the offline check of a store. [`publish`] is the other side of RabbitMQ ingest: the
//! confirmed publisher of `fleetwatch-sim`, the tests and the benchmarks.

pub mod actors;
pub mod app;
pub mod background;
pub mod codec;
pub mod config;
pub mod engine;
pub mod http;
pub mod ingest;
pub mod notify;
pub mod projections;
pub mod publish;
pub mod retention;
pub mod rules;
pub mod store;
pub mod subscription;
pub mod telemetry;
pub mod verify;
