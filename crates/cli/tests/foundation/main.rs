//! End-to-end tests of the `cascade` binary against real PostgreSQL and Redis servers.
//! One test binary (modules below) so the suite links once.

mod billing;
mod cache_cli;
mod cluster_check;
mod common;
mod config;
mod connections;
mod dashboard;
mod embedded;
mod health;
mod identity;
mod login_limits;
mod metrics;
mod migrate;
mod paused_instance;
mod prometheus;
mod replicas;
mod seed;
mod shutdown;
mod startup;
mod unified;
mod workers;
