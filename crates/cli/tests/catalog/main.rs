//! The catalog module end to end: real `cascade serve` processes on a private PostgreSQL and
//! Redis, driven over HTTP.

#[allow(dead_code)]
#[path = "../foundation/common.rs"]
mod common;
mod support;

mod bundle;
mod cli;
mod freshness;
mod lineage;
mod listings;
mod ready;
mod writes;
