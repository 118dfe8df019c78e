use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A TCP proxy in front of Redis that can make its pub/sub subscriptions half-open: the
/// sockets stay open, and nothing more goes through them in either direction. That is what a
/// NAT that forgot a flow or a peer that vanished without a FIN look like to a subscriber:
/// no error, no end of stream, only silence. Other connections (commands) are not touched.
///
/// A connection counts as a subscription once its client sent `SUBSCRIBE` (RESP sends
/// command names as plain bytes).
pub struct StallProxy {
    port: u16,
    stalling: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl StallProxy {
    /// Forwards connections on a new loopback port to `127.0.0.1:target`.
    pub async fn start(target: u16) -> StallProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let (stalling, _) = watch::channel(false);
        let stall_tx = stalling.clone();
        let task = tokio::spawn(async move {
            // Every connection task ends with this one: dropping the proxy closes them all.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                connections.spawn(forward(client, target, stall_tx.subscribe()));
            }
        });
        StallProxy {
            port,
            stalling,
            task,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `true`: every subscription, open or opened from now on, goes silent for good (its
    /// sockets stay open). `false`: subscriptions opened from now on work again; the ones
    /// already silent stay so (half-open until the proxy is dropped).
    pub fn stall_subscriptions(&self, stall: bool) {
        self.stalling.send_replace(stall);
    }
}

impl Drop for StallProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(mut client: TcpStream, target: u16, mut stalling: watch::Receiver<bool>) {
    let Ok(mut server) = TcpStream::connect(("127.0.0.1", target)).await else {
        return;
    };
    let mut subscriber = false;
    let (mut up, mut down) = ([0u8; 16 * 1024], [0u8; 16 * 1024]);
    loop {
        tokio::select! {
            read = client.read(&mut up) => {
                let Ok(n @ 1..) = read else { return };
                if contains(&up[..n], b"SUBSCRIBE") {
                    subscriber = true;
                }
                if subscriber && *stalling.borrow() {
                    break;
                }
                if server.write_all(&up[..n]).await.is_err() {
                    return;
                }
            }
            read = server.read(&mut down) => {
                let Ok(n @ 1..) = read else { return };
                if subscriber && *stalling.borrow() {
                    break;
                }
                if client.write_all(&down[..n]).await.is_err() {
                    return;
                }
            }
            changed = stalling.changed() => {
                if changed.is_err() {
                    return;
                }
                if subscriber && *stalling.borrow() {
                    break;
                }
            }
        }
    }
    // Half-open: both sockets stay open and silent until the proxy is dropped.
    let _held = (client, server);
    std::future::pending::<()>().await;
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle))
}
