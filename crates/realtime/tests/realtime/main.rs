//! The real-time module end to end: the real application (one or two instances on one
//! PostgreSQL and one Redis) and WebSocket clients over loopback.

mod access;
mod batch;
mod epochs;
mod fanout;
mod frames;
mod overflow;
mod resume;
mod review;
mod support;
