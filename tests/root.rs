//! `meshca root init` and `root show` against a real SoftHSM token: every key type, the
//! refusal to replace a key, and the key's protection attributes.

mod common;

use common::certs::*;
use common::*;
use meshca::pki::keys::KeyType;

#[test]
fn root_init_works_for_every_key_type_and_openssl_agrees() {
    for key_type in KeyType::ALL {
        let env = Env::with(EnvSpec {
            root_key_type: key_type,
            ..EnvSpec::default()
        });
        // Self-signed and valid, checked by an independent implementation.
        let text = openssl_root_text(&env, key_type.name());
        assert!(text.contains("CA:TRUE, pathlen:1"), "{key_type}: {text}");
        assert!(
            text.contains("Certificate Sign, CRL Sign"),
            "{key_type}: {text}"
        );
        assert!(text.contains("O = acme"), "{key_type}: {text}");
        let expected_key = match key_type.rsa_bits() {
            Some(bits) => format!("Public-Key: ({bits} bit)"),
            None => format!(
                "Public-Key: ({} bit)",
                if key_type == KeyType::EcdsaP256 {
                    256
                } else {
                    384
                }
            ),
        };
        assert!(text.contains(&expected_key), "{key_type}: {text}");
        let expected_sig = match key_type {
            KeyType::EcdsaP256 => "ecdsa-with-SHA256",
            KeyType::EcdsaP384 => "ecdsa-with-SHA384",
            _ => "sha256WithRSAEncryption",
        };
        assert!(text.contains(expected_sig), "{key_type}: {text}");
    }
}

#[test]
fn root_init_refuses_to_replace_a_key_unless_forced() {
    let env = Env::new();
    let first = env.root_pem();
    // The certificate file moved away: the key alone is what is refused.
    let certificate = env.path("root-cert.pem");
    let aside = env.path("root-cert.pem.aside");
    std::fs::rename(&certificate, &aside).unwrap();
    let out = env.run_with_config(&["root", "init"]);
    let stderr = text(&out.stderr);
    // 73: the key is there, as the certificate file would be.
    assert_eq!(out.status.code(), Some(73), "{stderr}");
    // Perhaps a root's whose certificate file was lost: where to find that comes first.
    assert!(
        stderr.contains("a key with the label or the id of")
            && stderr.contains("its certificate is in every cluster's root-cert.pem")
            && stderr.contains("pass --force only for a key no root in use has"),
        "{stderr}"
    );
    assert!(!certificate.exists(), "a refused init wrote a certificate");
    // Put back (a cluster's root-cert.pem holds the same certificate), it is the key's.
    std::fs::rename(&aside, &certificate).unwrap();
    let shown = env.run_with_config_ok(&["root", "show"]);
    assert!(
        text(&shown.stdout).contains("root certificate's    yes"),
        "{}",
        text(&shown.stdout)
    );

    let out = env.run_with_config_ok(&["root", "init", "--force"]);
    assert!(text(&out.stdout).contains("replaced the previous key"));
    assert_ne!(env.root_pem(), first);
    // The replaced key is gone: the signer starts against the new root (it proves the key
    // matches the certificate by signing a challenge).
    let mut signer = env.start_signer();
    assert!(signer.terminate());

    // A `--force` killed after making its new key pair (under `root-ca.meshca-new`, which
    // a config naming that label makes here) left it beside the root's: the next one
    // removes it, and the token holds one pair the URI names.
    let config = std::fs::read_to_string(&env.config).unwrap();
    let leftover = env.path("leftover.toml");
    std::fs::write(
        &leftover,
        config
            .replace("object=root-ca\"", "object=root-ca.meshca-new\"")
            .replace("\"root-cert.pem\"", "\"leftover-cert.pem\""),
    )
    .unwrap();
    run_ok(
        env.meshca()
            .args(["root", "init", "--config"])
            .arg(&leftover),
    );
    env.run_with_config_ok(&["root", "init", "--force"]);
    let mut signer = env.start_signer();
    assert!(signer.terminate());
    // Gone: a root init under that label (its certificate file out of the way) finds
    // nothing to replace.
    std::fs::remove_file(env.path("leftover-cert.pem")).unwrap();
    let again = run(env
        .meshca()
        .args(["root", "init", "--config"])
        .arg(&leftover));
    assert!(again.status.success(), "{}", text(&again.stderr));
}

/// The certificate file a config names is some root's: a root change's config copied
/// without naming another file would otherwise have the next root's certificate written
/// over the root in force's, with exit 0, and the signer would not start again.
#[test]
fn root_init_refuses_to_replace_a_root_certificate_file_unless_forced() {
    let env = Env::new();
    let first = env.root_pem();
    let config = std::fs::read_to_string(&env.config).unwrap();
    let next = env.path("next.toml");
    let edited = config.replace("object=root-ca\"", "object=root-ca-next\"");
    assert_ne!(edited, config);
    std::fs::write(&next, &edited).unwrap();
    let out = run(env.meshca().args(["root", "init", "--config"]).arg(&next));
    let stderr = text(&out.stderr);
    // 73 (EX_CANTCREAT): already there, as a playbook tells it from a failure.
    assert_eq!(out.status.code(), Some(73), "{stderr}");
    assert!(
        stderr.contains("root-cert.pem already exists")
            && stderr.contains("name another file in [root] certificate")
            && stderr.contains("--force"),
        "{stderr}"
    );
    assert_eq!(
        env.root_pem(),
        first,
        "the root in force's file was replaced"
    );
    // Nothing was made in the token either: the next root's label is still free.
    let moved = edited.replace("\"root-cert.pem\"", "\"next-root-cert.pem\"");
    std::fs::write(&next, moved).unwrap();
    let out = run_ok(env.meshca().args(["root", "init", "--config"]).arg(&next));
    assert!(
        !text(&out.stdout).contains("replaced the previous key"),
        "{}",
        text(&out.stdout)
    );
    let mut signer = env.start_signer();
    assert!(signer.terminate());
}

#[test]
fn root_init_refuses_an_id_another_key_has() {
    let env = Env::new();
    let config = std::fs::read_to_string(&env.config).unwrap();
    let with_key = |name: &str, key: &str| {
        let path = env.path(&format!("{name}.toml"));
        let text = config
            .replace("object=root-ca\"", &format!("{key}\""))
            .replace("\"root-cert.pem\"", &format!("\"{name}-cert.pem\""));
        assert_ne!(text, config);
        std::fs::write(&path, text).unwrap();
        path
    };
    // The root in force, named by its id alone.
    let current = with_key("current", "id=%01");
    run_ok(
        env.meshca()
            .args(["root", "init", "--config"])
            .arg(&current),
    );
    // The next root, made as "Changing the root" says (another object= label), but with
    // the same id: the current root's URI would find two keys.
    let next = with_key("next", "object=next;id=%01");
    let out = run(env.meshca().args(["root", "init", "--config"]).arg(&next));
    let stderr = text(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("already has the id"),
        "{stderr}"
    );
    // Nothing was made: the current root's key is still the only one with that id.
    run_ok(
        env.meshca()
            .args(["root", "show", "--config"])
            .arg(&current),
    );
    assert!(!env.path("next-cert.pem").exists());
}

#[test]
fn root_init_refuses_a_label_another_id_has_and_force_leaves_one_key_under_it() {
    let env = Env::new();
    let first = env.root_pem();
    // The root in force's config (`object=root-ca`, the id root init chose), with an id
    // added: the URI names no key, but the label is the root's.
    let config = std::fs::read_to_string(&env.config).unwrap();
    let with_id = env.path("with-id.toml");
    let edited = config.replace("object=root-ca\"", "object=root-ca;id=%01\"");
    assert_ne!(edited, config);
    std::fs::write(&with_id, edited).unwrap();

    let out = run(env
        .meshca()
        .args(["root", "init", "--config"])
        .arg(&with_id));
    let stderr = text(&out.stderr);
    // The token's key is there: 73, as for the certificate file.
    assert_eq!(out.status.code(), Some(73), "{stderr}");
    assert!(
        stderr.contains("already exists") && stderr.contains("--force"),
        "{stderr}"
    );
    assert_eq!(
        env.root_pem(),
        first,
        "a refused init must not touch the root certificate"
    );
    // The root in force still finds its one key.
    env.run_with_config_ok(&["root", "show"]);

    // Forced, the new pair replaces the key under the label: the label alone finds one
    // key, the one the new certificate was made with.
    let out = run_ok(
        env.meshca()
            .args(["root", "init", "--force", "--config"])
            .arg(&with_id),
    );
    assert!(text(&out.stdout).contains("replaced the previous key"));
    assert_ne!(env.root_pem(), first);
    env.run_with_config_ok(&["root", "show"]);
    let mut signer = env.start_signer();
    assert!(signer.terminate());
}

#[test]
fn root_key_type_must_satisfy_the_virtual_mesh() {
    let spec = EnvSpec {
        virtual_meshes: vec![virtual_mesh(
            "test",
            "vm",
            30,
            4096,
            "acme",
            &["test/cluster-a"],
        )],
        root_key_type: KeyType::Rsa2048,
        clients: vec![],
        ..EnvSpec::default()
    };
    let env = Env::prepare(&spec);
    let out = env.run_with_config(&["root", "init"]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("rsa2048") && stderr.contains("4096"),
        "{stderr}"
    );
    assert!(!env.path("root-cert.pem").exists());
}

#[test]
fn root_show_reports_a_key_that_cannot_leave_the_token() {
    let env = Env::new();
    let out = env.run_with_config_ok(&["root", "show"]);
    let stdout = text(&out.stdout);
    for line in [
        "CKA_TOKEN             true",
        "CKA_PRIVATE           true",
        "CKA_SENSITIVE         true",
        "CKA_EXTRACTABLE       false",
        "CKA_ALWAYS_SENSITIVE  true",
        "CKA_NEVER_EXTRACTABLE true",
        "CKA_DECRYPT           false",
        "CKA_UNWRAP            false",
        "CKA_SIGN_RECOVER      false",
        "CKA_DERIVE            false",
        "CKA_VALUE readable    no",
        "root certificate's    yes",
    ] {
        assert!(stdout.contains(line), "{line:?} missing from\n{stdout}");
    }
    assert!(!stdout.contains(&env.user_pin()), "the PIN was printed");
    assert!(
        !text(&out.stderr).contains("warning"),
        "{}",
        text(&out.stderr)
    );
}

/// A config whose key is another root's than its certificate's (a root change's config
/// half edited): the signer would refuse to start, so `root show` fails too, by name.
#[test]
fn root_show_fails_for_a_key_that_is_not_the_certificates() {
    let env = Env::new();
    env.init_next_root();
    let config = std::fs::read_to_string(&env.config).unwrap();
    let mixed = env.path("mixed.toml");
    let edited = config.replace("object=root-ca\"", "object=root-ca-next\"");
    assert_ne!(edited, config);
    std::fs::write(&mixed, edited).unwrap();
    let out = run(env.meshca().args(["root", "show", "--config"]).arg(&mixed));
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stdout.contains("root certificate's    NO"), "{stdout}");
    assert!(
        stderr.contains("does not match the root certificate"),
        "{stderr}"
    );
}

#[test]
fn a_root_key_not_on_the_token_is_not_answered_with_root_init() {
    let env = Env::new();
    let config = std::fs::read_to_string(&env.config).unwrap();
    let elsewhere = env.path("elsewhere.toml");
    let edited = config.replace("object=root-ca\"", "object=root-ca-gone\"");
    assert_ne!(edited, config);
    std::fs::write(&elsewhere, edited).unwrap();
    for args in [&["root", "show"][..], &["serve", "--check", "--online"]] {
        let out = run(env.meshca().args(args).arg("--config").arg(&elsewhere));
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains("no private key matches pkcs11:token=meshca-test;object=root-ca-gone")
                && stderr.contains("though the root certificate was made with one")
                && stderr.contains("`meshca root init` would make a new root")
                && !stderr.contains("root init` first"),
            "{args:?}: {stderr}"
        );
    }
}

#[test]
fn a_module_that_loads_but_cannot_initialize_is_not_reported_as_missing() {
    let env = Env::new();
    // SoftHSM's C_Initialize fails without its token directory; the library is there.
    std::fs::rename(env.path("softhsm/tokens"), env.path("softhsm/tokens.away")).unwrap();
    let out = env.run_with_config(&["root", "show"]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("loaded but failed to initialize") && !stderr.contains("cannot load"),
        "{stderr}"
    );
}

#[test]
fn wrong_pin_fails_clearly_without_echoing_it() {
    let env = Env::new();
    std::fs::write(env.path("softhsm/user-pin"), "not-the-pin\n").unwrap();
    let out = env.run_with_config(&["root", "show"]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    // Checked before any message prints stderr, which would then hold the PIN.
    assert!(!stderr.contains("not-the-pin"), "the PIN was printed");
    // Where the PIN came from: the one place to correct it.
    assert!(
        stderr.contains(&format!(
            "refused the user PIN (read from pkcs11.pin_file {})",
            env.path("softhsm/user-pin").display()
        )),
        "{stderr}"
    );
    // 78 as `serve` exits: a script retrying until it passes would lock the token.
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    let out = env.run_with_config(&["root", "init", "--force"]);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out.stderr));
}

#[test]
fn a_pin_from_the_environment_is_used_and_never_echoed_when_it_is_not_utf8() {
    use std::os::unix::ffi::OsStrExt;
    let env = Env::new();
    let config = std::fs::read_to_string(&env.config).unwrap();
    let from_env = config.replace(
        "pin_file = \"softhsm/user-pin\"",
        "pin_env = \"MESHCA_TEST_PIN\"",
    );
    assert_ne!(config, from_env);
    std::fs::write(&env.config, from_env).unwrap();

    let out = run_ok(
        env.meshca_with_config(&["root", "show"])
            .env("MESHCA_TEST_PIN", env.user_pin()),
    );
    assert!(text(&out.stdout).contains("CKA_EXTRACTABLE       false"));

    let not_utf8 = std::ffi::OsStr::from_bytes(b"pin-\xff-hidden");
    let out = run(env
        .meshca_with_config(&["root", "show"])
        .env("MESHCA_TEST_PIN", not_utf8));
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    // Checked before any message prints stderr, which would then hold the PIN.
    assert!(!stderr.contains("hidden"), "the PIN was printed");
    assert!(
        stderr.contains("MESHCA_TEST_PIN") && stderr.contains("not valid UTF-8"),
        "{stderr}"
    );
}

/// `token init` checks both PINs' lengths against the token before C_InitToken, so a PIN
/// the token will not take leaves nothing behind; a token some earlier init left without a
/// user PIN is named as such instead of only "exists".
#[test]
fn token_init_checks_pin_lengths_first_and_names_a_half_made_token() {
    let env = Env::new();
    let tokens = env.path("softhsm/tokens");
    let empty_tokens = || {
        std::fs::remove_dir_all(&tokens).unwrap();
        std::fs::create_dir(&tokens).unwrap();
    };
    let token_init = |so_pin_file: &str| {
        env.meshca_with_config(&["token", "init"])
            .arg("--so-pin-file")
            .arg(env.path(so_pin_file))
            .output()
            .unwrap()
    };
    let write_pin = |name: &str, pin: &str| {
        use std::os::unix::fs::OpenOptionsExt;
        let path = env.path(name);
        let _ = std::fs::remove_file(&path);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .unwrap();
        std::io::Write::write_all(&mut file, pin.as_bytes()).unwrap();
    };
    empty_tokens();

    write_pin("short-so-pin", "q7z");
    let out = token_init("short-so-pin");
    let stderr = text(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains(
                "the security officer PIN is shorter than this token takes (4 to 255 characters)"
            )
            && !stderr.contains("q7z"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_dir(&tokens).unwrap().count(),
        0,
        "a token was made"
    );

    let user_pin = std::fs::read_to_string(env.path("softhsm/user-pin")).unwrap();
    write_pin("softhsm/user-pin", "k9w");
    let out = token_init("softhsm/so-pin");
    let stderr = text(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("the user PIN is shorter than this token takes")
            && !stderr.contains("k9w"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_dir(&tokens).unwrap().count(),
        0,
        "a token was made"
    );
    write_pin("softhsm/user-pin", &user_pin);

    // C_InitToken without C_InitPIN, as an init stopped half way leaves it. pkcs11-tool
    // takes an SO PIN only on its command line: a throwaway one, for this token alone.
    let out = std::process::Command::new("pkcs11-tool")
        .env("SOFTHSM2_CONF", env.path("softhsm/softhsm2.conf"))
        .args([
            "--module",
            &softhsm_module(),
            "--init-token",
            "--label",
            "meshca-test",
        ])
        .args(["--so-pin", "throwaway-so-pin"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = token_init("softhsm/so-pin");
    let stderr = text(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("already exists without a user PIN")
            && stderr.contains("softhsm2-util --delete-token"),
        "{stderr}"
    );

    // Deleted, the token is made whole with the environment's PINs.
    empty_tokens();
    let out = token_init("softhsm/so-pin");
    assert!(out.status.success(), "{}", text(&out.stderr));
    // The environment's root certificate is still there, its key gone with the token.
    env.run_with_config_ok(&["root", "init", "--force"]);
}

/// A PKCS#11 module that another user could replace is refused before it is loaded, by
/// `serve --check` and by every command that loads it, naming the file or directory:
/// the module runs with the PIN and the root key's sessions.
#[test]
fn a_module_others_could_replace_is_refused_before_it_is_loaded() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let dir = env.path("modules");
    std::fs::create_dir(&dir).unwrap();
    let module = dir.join("libsofthsm2.so");
    std::fs::copy(softhsm_module(), &module).unwrap();
    let config = std::fs::read_to_string(&env.config).unwrap();
    let config = config.replace(
        &format!("module = \"{}\"", softhsm_module()),
        &format!("module = \"{}\"", module.display()),
    );
    assert!(config.contains("modules/libsofthsm2.so"), "{config}");
    std::fs::write(&env.config, config).unwrap();
    let chmod = |path: &std::path::Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    chmod(&dir, 0o755);
    chmod(&module, 0o644);
    env.run_with_config_ok(&["root", "show"]);

    chmod(&module, 0o666);
    for command in [&["serve", "--check"][..], &["root", "show"][..]] {
        let out = env.run_with_config(command);
        let stderr = text(&out.stderr);
        assert!(
            !out.status.success()
                && stderr.contains(&format!(
                    "its file {} can be written by any user (mode 666)",
                    module.display()
                ))
                && stderr.contains("chmod go-w"),
            "{command:?}: {stderr}"
        );
    }
    chmod(&module, 0o644);
    chmod(&dir, 0o775);
    let stderr = text(&env.run_with_config(&["root", "show"]).stderr);
    assert!(
        stderr.contains(&format!(
            "its directory {} can be written by its group (mode 775)",
            dir.display()
        )),
        "{stderr}"
    );
    // The sticky bit keeps others from replacing a file they do not own (/tmp).
    chmod(&dir, 0o1777);
    env.run_with_config_ok(&["root", "show"]);
}

/// A root name X.520 does not allow is `root init`'s refusal only: a signer whose root
/// already exists (made by an older build, which cut or passed on the name) serves with
/// the same config.
#[test]
fn only_root_init_refuses_a_default_root_name_too_long_for_a_certificate() {
    for backend in Backend::both() {
        let org = "o".repeat(60);
        let spec = EnvSpec {
            virtual_meshes: vec![virtual_mesh(
                "test",
                "vm",
                30,
                2048,
                &org,
                &["test/cluster-a"],
            )],
            clients: vec![],
            backend: backend.clone(),
            ..EnvSpec::default()
        };
        let env = Env::prepare(&spec);
        let out = env.run_with_config(&["root", "init"]);
        assert!(!out.status.success(), "{}", backend.name());
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains("the default root common name")
                && stderr.contains("has 68 characters")
                && stderr.contains("set root.common_name"),
            "{}: {stderr}",
            backend.name()
        );
        assert!(!env.path("root-cert.pem").exists(), "{}", backend.name());

        // The root made with a name of its own; the config then goes back to none.
        let config = std::fs::read_to_string(&env.config).unwrap();
        let named = config.replace(
            "key_type = ",
            "common_name = \"made by an older build\"\nkey_type = ",
        );
        std::fs::write(&env.config, &named).unwrap();
        env.run_with_config_ok(&["root", "init"]);
        std::fs::write(&env.config, &config).unwrap();
        let report = text(&env.run_with_config_ok(&["serve", "--check"]).stdout);
        assert!(report.contains("is valid"), "{}: {report}", backend.name());
    }
}

#[test]
fn a_key_type_other_than_the_roots_is_refused_by_serve_and_its_check() {
    let env = Env::new();
    let config = std::fs::read_to_string(&env.config).unwrap();
    let other = config.replace("key_type = \"ecdsa-p384\"", "key_type = \"rsa4096\"");
    assert_ne!(other, config, "{config}");
    std::fs::write(&env.config, other).unwrap();
    // --check first: were the mismatch let through, `serve` would run on.
    for command in [&["serve", "--check"][..], &["serve"][..]] {
        let out = env.run_with_config(command);
        let stderr = text(&out.stderr);
        assert!(
            !out.status.success()
                && stderr.contains("root.key_type rsa4096 does not match the root certificate ")
                && stderr.contains("root-cert.pem (ECDSA P-384)"),
            "{command:?}: {stderr}"
        );
    }
    // `root show` still shows the root, to see what key_type should be.
    let shown = text(&env.run_with_config_ok(&["root", "show"]).stdout);
    assert!(shown.contains("P-384"), "{shown}");
}
