//! Cascade's HTTP server: composes the modules and the cross-cutting HTTP layer.
//!
//! - [`settings`]: every setting, the platform's and each module's, parsed together;
//! - [`application`]: [`Application::build`], the one way to build the application;
//! - [`http`]: middleware, health, metrics, the dashboard and the composed [`app`](http::app);
//! - [`auth`]: accounts, sessions and tokens over HTTP;
//! - [`process`]: logging set-up and the termination signals of the binaries;
//! - [`testing`]: the real application in-process on a free port, for the modules' tests;
//! - [`serve`]: run the application ([`http::App`]) on a listener until a shutdown signal,
//!   draining in-flight requests;
//!   every connection under a header and an idle deadline, their number capped
//!   (`connections`).
//!
//! What a module needs from HTTP lives below the modules, in `cascade-http`; the modules
//! themselves (`cascade-catalog`, `cascade-app`) are composed here and nowhere else.

pub mod application;
pub mod auth;
mod connections;
pub mod http;
pub mod process;
pub mod settings;
pub mod state;
pub mod testing;

pub use application::{Application, BuildOptions};
pub use connections::serve;
pub use settings::{RawSettings, Settings};
