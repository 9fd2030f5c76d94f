//! A real Pushpin (Debian's `pushpin`, with its `zurl`) on loopback, on free ports and a run
//! directory of its own, in front of the given engines; stopped when dropped.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;

pub struct Pushpin {
    /// Where clients connect: `http://127.0.0.1:<port>`.
    pub base: String,
    /// Where engines publish (`--grip-publish-url`).
    pub publish_url: String,
    /// The key Pushpin signs its requests with (`--grip-key`).
    pub sig_key: String,
    pushpin: Child,
    zurl: Child,
    _dir: tempfile::TempDir,
}

impl Pushpin {
    /// Starts Pushpin routing every request to `origins` (`host:port`), and waits until it
    /// listens. Fails loudly when Pushpin is not installed (`scripts/test-deps.sh` installs it).
    pub fn start(origins: &[String]) -> Pushpin {
        let dir = tempfile::tempdir().expect("temp dir");
        let run = dir.path().join("run");
        let logs = dir.path().join("log");
        std::fs::create_dir_all(&run).expect("run dir");
        std::fs::create_dir_all(&logs).expect("log dir");
        let http_port = free_port();
        let publish_port = free_port();
        let ipc = |name: &str| format!("ipc://{}/{name}", run.display());
        // Pushpin's outgoing requests go through zurl; Debian's default denies loopback targets,
        // so this one allows them.
        let zurl_conf = dir.path().join("zurl.conf");
        std::fs::write(
            &zurl_conf,
            format!(
                "[General]\nin_spec={}\nin_stream_spec={}\nout_spec={}\ndefpolicy=allow\nallow=\ndeny=\n\
                 max_open_requests=2000\nbuffer_size=200000\ntimeout=600\n",
                ipc("zurl-in"),
                ipc("zurl-in-stream"),
                ipc("zurl-out")
            ),
        )
        .expect("zurl.conf");
        let routes = dir.path().join("routes");
        std::fs::write(&routes, format!("* {}\n", origins.join(" "))).expect("routes");
        let defaults = std::fs::read_to_string("/etc/pushpin/pushpin.conf")
            .expect("Pushpin's configuration (/etc/pushpin/pushpin.conf): is pushpin installed?");
        let sig_key = uuid::Uuid::new_v4().simple().to_string();
        let conf = pushpin_conf(
            &defaults,
            dir.path(),
            &routes,
            http_port,
            publish_port,
            &ipc,
        )
        .lines()
        .map(|line| match line.strip_prefix("sig_key=") {
            Some(_) => format!("sig_key={sig_key}"),
            None => line.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n");
        let conf_path = dir.path().join("pushpin.conf");
        std::fs::write(&conf_path, conf).expect("pushpin.conf");
        let zurl = Command::new("zurl")
            .arg(format!("--config={}", zurl_conf.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("zurl (installed with pushpin)");
        let pushpin = Command::new("pushpin")
            .arg("--config")
            .arg(&conf_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("pushpin");
        let started = Instant::now();
        while !(listening(http_port) && listening(publish_port)) {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "Pushpin did not listen on {http_port} and {publish_port}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Pushpin {
            base: format!("http://127.0.0.1:{http_port}"),
            publish_url: format!("http://127.0.0.1:{publish_port}/publish/"),
            sig_key,
            pushpin,
            zurl,
            _dir: dir,
        }
    }
}

fn listening(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// Debian's configuration with this instance's directories, ports and sockets.
fn pushpin_conf(
    defaults: &str,
    dir: &Path,
    routes: &Path,
    http_port: u16,
    publish_port: u16,
    ipc: &dyn Fn(&str) -> String,
) -> String {
    let tcp = |port: u16| format!("tcp://127.0.0.1:{port}");
    let mut out = String::new();
    for line in defaults.lines() {
        let key = line.split('=').next().unwrap_or_default();
        let replaced = match key {
            "rundir" => format!("rundir={}", dir.join("run").display()),
            "logdir" => format!("logdir={}", dir.join("log").display()),
            "ipc_prefix" => "ipc_prefix=pp-".to_owned(),
            "http_port" => format!("http_port={http_port}"),
            "routesfile" => format!("routesfile={}", routes.display()),
            "push_in_http_port" => format!("push_in_http_port={publish_port}"),
            "push_in_spec" => format!("push_in_spec={}", tcp(free_port())),
            "push_in_sub_specs" => format!("push_in_sub_specs={}", tcp(free_port())),
            "command_spec" if line.contains("tcp://") => {
                format!("command_spec={}", tcp(free_port()))
            }
            _ => line.to_owned(),
        };
        out.push_str(&replaced);
        out.push('\n');
        if line.trim() == "[proxy]" {
            out.push_str(&format!(
                "zurl_out_specs={}\nzurl_out_stream_specs={}\nzurl_in_specs={}\n",
                ipc("zurl-in"),
                ipc("zurl-in-stream"),
                ipc("zurl-out")
            ));
        }
    }
    out
}

impl Drop for Pushpin {
    fn drop(&mut self) {
        // SIGTERM: Pushpin's runner stops the processes it started.
        for child in [&mut self.pushpin, &mut self.zurl] {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
        for child in [&mut self.pushpin, &mut self.zurl] {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
