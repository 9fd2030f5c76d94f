//! Ingest: how readings enter the engine. [`wire`] is the JSON format shared by every path;
//! [`amqp`] consumes readings from RabbitMQ; [`failed`] remembers what could not be processed.
//! (HTTP ingest is a route in `http`.)

pub mod amqp;
pub mod failed;
mod partitions;
pub mod wire;
