//! `cascade-venice-standin [--ledger fixtures.json] [--port N] [--delay-ms N]`: the Venice
//! stand-in of the test kit as a process, for development (`VENICE_API_URL=http://127.0.0.1:N`).
//! The fixtures are a JSON object: citizen username → what `/get-ledger` answers for them.

use std::collections::HashMap;
use std::time::Duration;

use cascade_testkit::venice::{VeniceStandin, sample_citizens};

fn usage() -> ! {
    eprintln!("usage: cascade-venice-standin [--ledger fixtures.json] [--port N] [--delay-ms N]");
    std::process::exit(2)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut citizens = sample_citizens();
    let mut port = 0u16;
    let mut delay = Duration::ZERO;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next().unwrap_or_else(|| usage());
        match arg.as_str() {
            "--ledger" => {
                let text = std::fs::read_to_string(&value).unwrap_or_else(|err| {
                    eprintln!("{value}: {err}");
                    std::process::exit(1)
                });
                citizens = serde_json::from_str::<HashMap<String, serde_json::Value>>(&text)
                    .unwrap_or_else(|err| {
                        eprintln!("{value}: expected an object of username → ledger: {err}");
                        std::process::exit(1)
                    });
            }
            "--port" => port = value.parse().unwrap_or_else(|_| usage()),
            "--delay-ms" => {
                delay = Duration::from_millis(value.parse().unwrap_or_else(|_| usage()));
            }
            _ => usage(),
        }
    }
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap_or_else(|err| {
            eprintln!("bind 127.0.0.1:{port}: {err}");
            std::process::exit(1)
        });
    let count = citizens.len();
    let standin = VeniceStandin::serve_on(listener, citizens);
    standin.slow_down(delay);
    println!("Venice stand-in: {} ({count} citizens)", standin.url());
    let _ = tokio::signal::ctrl_c().await;
}
