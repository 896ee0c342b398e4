//! A real OpenBao server for a test, on 127.0.0.1 with a free port: `bao server -dev` (in
//! memory, unsealed, root token from BAO_DEV_ROOT_TOKEN_ID), or a Raft-backed server that
//! survives a stop and comes back sealed. Root token and unseal key stay in memory and
//! reach the `bao` CLI through environment variables and stdin, never argv; the server's
//! output goes to a 0600 file in the test's temp dir, never to the test output. The server
//! is killed when this value is dropped, and by the kernel if the test thread dies first.
#![allow(dead_code)]

use std::fs::OpenOptions;
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The `bao` binary, found the way `make demo-vault` finds it.
pub fn bao_binary() -> PathBuf {
    let out = Command::new(super::repo().join("scripts/bao-path.sh"))
        .output()
        .expect("run scripts/bao-path.sh");
    assert!(
        out.status.success(),
        "OpenBao is not installed: run `make deps` (scripts/install-deps.sh): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// A port the OS says is free right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).unwrap();
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes a file only its owner can read, created with that mode.
pub fn write_secret(path: &Path, contents: &str) {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    file.write_all(contents.as_bytes()).unwrap();
}

/// Whether /proc says the process is stopped (state T).
fn process_stopped(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The state follows the command name, which is in parentheses and may hold spaces.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next())
        == Some('T')
}

enum Mode {
    Dev,
    Raft { config: PathBuf, unseal_key: String },
}

pub struct OpenBao {
    child: Option<Child>,
    pub addr: SocketAddr,
    root_token: String,
    dir: PathBuf,
    mode: Mode,
    bao: PathBuf,
}

impl OpenBao {
    /// `bao server -dev`: in memory, unsealed, a random root token.
    pub fn dev(dir: &Path) -> OpenBao {
        std::fs::create_dir_all(dir).unwrap();
        let port = free_port();
        let mut bao = OpenBao {
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            root_token: format!("devroot-{}", random_hex(16)),
            dir: dir.to_path_buf(),
            mode: Mode::Dev,
            bao: bao_binary(),
        };
        bao.spawn();
        bao.wait_for(|status| status == 0);
        bao
    }

    /// A server with Raft storage in `dir`: initialized and unsealed here; after `stop`
    /// and `start` it comes back sealed, with its data.
    pub fn persistent(dir: &Path) -> OpenBao {
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let port = free_port();
        let cluster_port = free_port();
        let config = dir.join("openbao.hcl");
        std::fs::write(
            &config,
            format!(
                r#"storage "raft" {{
  path = "{data}"
  node_id = "meshca-test"
}}
listener "tcp" {{
  address = "127.0.0.1:{port}"
  cluster_address = "127.0.0.1:{cluster_port}"
  tls_disable = true
}}
api_addr = "http://127.0.0.1:{port}"
cluster_addr = "http://127.0.0.1:{cluster_port}"
"#,
                data = dir.join("data").display()
            ),
        )
        .unwrap();
        let mut bao = OpenBao {
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            root_token: String::new(),
            dir: dir.to_path_buf(),
            mode: Mode::Raft {
                config,
                unseal_key: String::new(),
            },
            bao: bao_binary(),
        };
        bao.spawn();
        // `bao status` exits 2 for a reachable, sealed server.
        bao.wait_for(|status| status == 2);
        let init = bao.cli_json(&["operator", "init", "-key-shares=1", "-key-threshold=1"]);
        bao.root_token = init["root_token"].as_str().unwrap().to_string();
        if let Mode::Raft { unseal_key, .. } = &mut bao.mode {
            *unseal_key = init["unseal_keys_b64"][0].as_str().unwrap().to_string();
        }
        bao.unseal();
        bao
    }

    pub fn address(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn spawn(&mut self) {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(self.dir.join("openbao.log"))
            .unwrap();
        let mut cmd = Command::new(&self.bao);
        cmd.arg("server");
        match &self.mode {
            Mode::Dev => {
                cmd.arg("-dev")
                    .arg(format!("-dev-listen-address={}", self.addr))
                    .arg("-dev-no-store-token")
                    .env("BAO_DEV_ROOT_TOKEN_ID", &self.root_token);
            }
            Mode::Raft { config, .. } => {
                cmd.arg(format!("-config={}", config.display()));
            }
        }
        cmd.env_remove("BAO_TOKEN")
            .env_remove("VAULT_TOKEN")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // SAFETY: prctl is async-signal-safe; the closure touches no Rust state.
        // The server dies with the thread that started it, even if the test is killed.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        self.child = Some(cmd.spawn().expect("spawn bao server"));
    }

    /// Polls `bao status` until its exit code satisfies `ready`.
    fn wait_for(&mut self, ready: impl Fn(i32) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let status = self.cli(&["status"]).status.code().unwrap_or(-1);
            if ready(status) {
                return;
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(exit)) = child.try_wait()
            {
                panic!(
                    "bao server exited ({exit}); its log is in {}",
                    self.dir.join("openbao.log").display()
                );
            }
            assert!(
                Instant::now() < deadline,
                "OpenBao at {} did not come up (bao status exit {status})",
                self.addr
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the server (SIGTERM) and waits for it to exit (at most
    /// [`super::EXIT_WAIT`]; past it, killed and the test failed).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            super::send_signal(child.id(), "TERM");
            if super::wait_within(&mut child, super::EXIT_WAIT).is_none() {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "bao server did not exit within {:?} of SIGTERM; its log is in {}",
                    super::EXIT_WAIT,
                    self.dir.join("openbao.log").display()
                );
            }
        }
    }

    /// Starts a stopped Raft server again; it comes back sealed.
    pub fn start(&mut self) {
        assert!(
            matches!(self.mode, Mode::Raft { .. }),
            "only Raft servers restart"
        );
        self.spawn();
        self.wait_for(|status| status == 2);
    }

    /// Unseals a Raft server (the key goes through stdin) and waits until it is active.
    pub fn unseal(&mut self) {
        let Mode::Raft { unseal_key, .. } = &self.mode else {
            return;
        };
        let key = unseal_key.clone();
        self.cli_stdin(&["write", "sys/unseal", "key=-"], &key);
        self.wait_for(|status| status == 0);
        // Right after unsealing, a Raft node is briefly a standby; wait until it serves.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.cli(&["read", "sys/leader"]).status.success()
            || !self
                .cli_text(&["read", "-field=is_self", "sys/leader"])
                .contains("true")
        {
            assert!(Instant::now() < deadline, "OpenBao did not become active");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGSTOP: the server keeps its port but answers nothing (a hung Vault). Returns
    /// once the kernel reports the process stopped.
    pub fn pause(&self) {
        self.signal_and_wait("STOP", true);
    }

    /// SIGCONT, and wait until the process runs again.
    pub fn resume(&self) {
        self.signal_and_wait("CONT", false);
    }

    fn signal_and_wait(&self, signal: &str, stopped: bool) {
        let pid = self.child.as_ref().expect("server not running").id();
        super::send_signal(pid, signal);
        let deadline = Instant::now() + Duration::from_secs(30);
        while process_stopped(pid) != stopped {
            assert!(
                Instant::now() < deadline,
                "bao server did not take SIG{signal}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A `bao` command against this server, authenticated with the root token (env).
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.bao);
        cmd.args(args)
            .env("BAO_ADDR", self.address())
            .env("BAO_TOKEN", &self.root_token)
            .env_remove("VAULT_TOKEN")
            .stdin(Stdio::null());
        cmd
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run bao")
    }

    /// Runs `bao` with `input` on stdin; must succeed. Only stderr is shown on failure
    /// (stdout may carry tokens).
    pub fn cli_stdin(&self, args: &[&str], input: &str) -> Output {
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run bao");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "bao {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Runs `bao`; must succeed. Only stderr is shown on failure.
    pub fn cli_ok(&self, args: &[&str]) -> Output {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "bao {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    pub fn cli_text(&self, args: &[&str]) -> String {
        String::from_utf8_lossy(&self.cli(args).stdout).into_owned()
    }

    /// `bao <args> -format=json` (the flag goes right after the subcommand).
    pub fn cli_json(&self, args: &[&str]) -> Value {
        let mut full: Vec<&str> = Vec::new();
        let split = if args.first() == Some(&"operator") || args.first() == Some(&"token") {
            2
        } else {
            1
        };
        full.extend_from_slice(&args[..split]);
        full.push("-format=json");
        full.extend_from_slice(&args[split..]);
        let out = self.cli_ok(&full);
        serde_json::from_slice(&out.stdout).expect("bao printed JSON")
    }

    /// A PKI secrets engine at `mount` whose max TTL allows ten years.
    pub fn enable_pki(&self, mount: &str) {
        self.cli_ok(&["secrets", "enable", &format!("-path={mount}"), "pki"]);
        self.cli_ok(&["secrets", "tune", "-max-lease-ttl=87600h", mount]);
    }

    /// A policy from HCL (through stdin).
    pub fn write_policy(&self, name: &str, hcl: &str) {
        self.cli_stdin(&["policy", "write", name, "-"], hcl);
    }

    /// A new token with `policies`; `extra` are more `bao token create` flags.
    pub fn create_token(&self, policies: &[&str], extra: &[&str]) -> String {
        let mut args = vec!["token", "create"];
        let flags: Vec<String> = policies.iter().map(|p| format!("-policy={p}")).collect();
        args.extend(flags.iter().map(String::as_str));
        args.extend_from_slice(extra);
        let answer = self.cli_json(&args);
        answer["auth"]["client_token"].as_str().unwrap().to_string()
    }

    /// An AppRole `role` with `policies` (its settings as `key=value`); returns
    /// (role_id, secret_id).
    pub fn create_approle(&self, role: &str, settings: &[&str]) -> (String, String) {
        if !self.cli_text(&["auth", "list"]).contains("approle/") {
            self.cli_ok(&["auth", "enable", "approle"]);
        }
        let path = format!("auth/approle/role/{role}");
        let mut args = vec!["write", path.as_str()];
        args.extend_from_slice(settings);
        self.cli_ok(&args);
        let role_id = self.cli_json(&["read", &format!("{path}/role-id")])["data"]["role_id"]
            .as_str()
            .unwrap()
            .to_string();
        let secret_id =
            self.cli_json(&["write", "-f", &format!("{path}/secret-id")])["data"]["secret_id"]
                .as_str()
                .unwrap()
                .to_string();
        (role_id, secret_id)
    }

    /// The root token, for tests that check it never shows up anywhere.
    pub fn root_token(&self) -> &str {
        &self.root_token
    }
}

impl Drop for OpenBao {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // A paused server must be woken to die of SIGTERM; SIGKILL needs no waking.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
