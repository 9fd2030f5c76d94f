//! A TCP relay to a real service (the broker, the database) that a test can cut: every
//! connection through it is dropped and new ones are refused until it is restored. The service
//! itself is shared by every test and left alone.

use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};

#[derive(Clone)]
pub struct Relay {
    pub port: u16,
    up: Arc<Mutex<bool>>,
    cut: Arc<tokio::sync::Notify>,
}

impl Relay {
    /// Relays connections to `target` (`host:port`) from a free port on 127.0.0.1.
    pub async fn start(target: &str) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let relay = Relay {
            port: listener.local_addr().expect("address").port(),
            up: Arc::new(Mutex::new(true)),
            cut: Arc::default(),
        };
        let serving = relay.clone();
        let target = target.to_owned();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !*serving.up.lock().expect("relay state") {
                    continue;
                }
                let cut = serving.cut.clone();
                let target = target.clone();
                tokio::spawn(async move {
                    let Ok(mut service) = TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut service) => {}
                        _ = cut.notified() => {}
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

    /// Drops every connection and refuses new ones.
    pub fn cut(&self) {
        *self.up.lock().expect("relay state") = false;
        self.cut.notify_waiters();
    }

    pub fn restore(&self) {
        *self.up.lock().expect("relay state") = true;
    }
}
