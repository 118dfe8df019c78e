//! The agents module end to end: the real application (`cascade_server::testing::TestApp`,
//! in-process, one per instance) on a private PostgreSQL and Redis, driven over HTTP.

mod support;

mod agents;
mod audit;
mod executions;
mod memory;
mod search;
