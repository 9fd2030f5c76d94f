//! A TCP relay to a real service (the broker, the database) that a test can cut: every
//! connection through it is dropped and new ones are refused until it is restored. The service
//! itself is shared by every test and left alone.

use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Clone)]
pub struct Relay {
    pub port: u16,
    /// Whether connections may pass. A state, not an event: a connection being set up when the
    /// relay is cut sees it as soon as it looks, so none outlives a cut.
    up: Arc<watch::Sender<bool>>,
}

impl Relay {
    /// Relays connections to `target` (`host:port`) from a free port on 127.0.0.1.
    pub async fn start(target: &str) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let relay = Relay {
            port: listener.local_addr().expect("address").port(),
            up: Arc::new(watch::channel(true).0),
        };
        let serving = relay.clone();
        let target = target.to_owned();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let mut up = serving.up.subscribe();
                if !*up.borrow_and_update() {
                    continue;
                }
                let target = target.clone();
                tokio::spawn(async move {
                    let relayed = async {
                        let mut service = TcpStream::connect(&target).await?;
                        tokio::io::copy_bidirectional(&mut client, &mut service).await
                    };
                    tokio::select! {
                        _ = relayed => {}
                        _ = up.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        relay
    }

    /// The RabbitMQ URL through the relay (guest/guest, the default vhost).
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// `url` (a test database on 127.0.0.1:5432) through the relay.
    pub fn postgres_url(&self, url: &str) -> String {
        let through = url.replace("127.0.0.1:5432", &format!("127.0.0.1:{}", self.port));
        assert_ne!(through, url, "the test database is on 127.0.0.1:5432");
        through
    }

    /// Drops every connection and refuses new ones.
    pub fn cut(&self) {
        self.up.send_replace(false);
    }

    pub fn restore(&self) {
        self.up.send_replace(true);
    }
}
