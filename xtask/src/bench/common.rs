//! Helpers the nginx-based benchmarks (`http`, `waf`) share: tool lookup, ports, nginx
//! configuration fragments, stopping processes.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command};
use std::thread;
use std::time::{Duration, Instant};

pub(crate) fn on_path(binary: &str) -> bool {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin", "/usr/local/bin"]
        .iter()
        .any(|dir| Path::new(dir).join(binary).exists())
}

pub(crate) fn nginx_binary() -> &'static str {
    if Path::new("/usr/sbin/nginx").exists() {
        "/usr/sbin/nginx"
    } else {
        "nginx"
    }
}

pub(crate) fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

pub(crate) fn wait_for_port(port: u16) -> anyhow::Result<()> {
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(50));
    }
    anyhow::bail!("nothing listens on 127.0.0.1:{port} after 10 s")
}

pub(crate) fn common_conf(dir: &Path, name: &str, workers: &str) -> String {
    let dir = dir.display();
    format!(
        "daemon off;\nmaster_process on;\nuser root;\nworker_processes {workers};\n\
         worker_rlimit_nofile 65535;\npid {dir}/{name}.pid;\n\
         error_log {dir}/{name}-error.log warn;\n\
         events {{ worker_connections 16384; multi_accept on; }}\n"
    )
}

pub(crate) fn http_common(dir: &Path, name: &str) -> String {
    let dir = dir.display();
    format!(
        "access_log off;\nkeepalive_requests 1000000;\nkeepalive_timeout 75s;\n\
         client_body_temp_path {dir}/{name}-body;\nproxy_temp_path {dir}/{name}-proxy;\n\
         fastcgi_temp_path {dir}/{name}-fastcgi;\nuwsgi_temp_path {dir}/{name}-uwsgi;\n\
         scgi_temp_path {dir}/{name}-scgi;\n"
    )
}

pub(crate) fn json_string(text: &str) -> String {
    let mut out = String::from("\"");
    for ch in text.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => {}
            other => out.push(other),
        }
    }
    out.push('"');
    out
}

pub(crate) fn stop(child: &mut Child, signal: &str) {
    let _ = Command::new("kill")
        .arg(signal)
        .arg(child.id().to_string())
        .status();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}
