//! `root init --force` against a token that refuses to destroy the key being replaced
//! (CKA_DESTROYABLE false here; an HSM role without delete rights refuses the same way):
//! nothing is replaced, the certificate file included. Its own test binary, so this
//! process's SOFTHSM2_CONF (which cryptoki's SoftHSM reads) is free.

mod common;

use common::*;
use cryptoki::object::{Attribute, ObjectClass};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;

/// Runs `work` in a logged-in read-write session on the environment's token, then
/// finalizes the module, so that the next meshca run and the next call here see the
/// token as it is on disk.
fn on_token<T>(env: &Env, work: impl FnOnce(&Session) -> T) -> T {
    let (pkcs11, slot) = open_test_token();
    let session = pkcs11.open_rw_session(slot).unwrap();
    session
        .login(
            UserType::User,
            Some(&AuthPin::from(env.user_pin().as_str())),
        )
        .unwrap();
    let out = work(&session);
    drop(session);
    pkcs11.finalize().unwrap();
    out
}

fn objects_labelled(session: &Session, label: &str) -> usize {
    session
        .find_objects(&[Attribute::Label(label.as_bytes().to_vec())])
        .unwrap()
        .len()
}

#[test]
fn a_forced_root_init_the_token_will_not_let_destroy_the_old_key_replaces_nothing() {
    let env = Env::new();
    // SAFETY: this test binary has a single test; no other thread reads the environment.
    unsafe { std::env::set_var("SOFTHSM2_CONF", env.path("softhsm/softhsm2.conf")) };
    let first = env.root_pem();
    on_token(&env, |session| {
        let keys = session
            .find_objects(&[
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::Label(b"root-ca".to_vec()),
            ])
            .unwrap();
        assert_eq!(keys.len(), 1);
        // SoftHSM sets CKA_DESTROYABLE only as an object is made: the root's key becomes a
        // copy that cannot be destroyed.
        session
            .copy_object(keys[0], &[Attribute::Destroyable(false)])
            .unwrap();
        session.destroy_object(keys[0]).unwrap();
    });

    let out = env.run_with_config(&["root", "init", "--force"]);
    let stderr = text(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("refused to destroy")
            && stderr.contains("holds the previous root again")
            && stderr.contains("the new key pair was removed"),
        "{stderr}"
    );
    assert_eq!(
        env.root_pem(),
        first,
        "the certificate file does not hold the root in force"
    );
    let (in_force, staged) = on_token(&env, |session| {
        (
            objects_labelled(session, "root-ca"),
            objects_labelled(session, "root-ca.meshca-new"),
        )
    });
    assert_eq!(staged, 0, "the new key pair was left on the token");
    assert_eq!(in_force, 2, "the root's private and public key");
    // The root in force is whole: a signer starts on it (proving the key by a signature).
    let mut signer = env.start_signer();
    assert!(signer.terminate());
}
