//! Independent of meshca's own code: open the token with cryptoki directly and try to get
//! the root private key out. Its own test binary, so this process's SOFTHSM2_CONF is free.

mod common;

use common::*;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeInfo, AttributeType, ObjectClass};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;

#[test]
fn the_root_private_key_cannot_be_read_or_wrapped_out_of_the_token() {
    let env = Env::new();
    // SAFETY: this test binary has a single test; no other thread reads the environment.
    unsafe { std::env::set_var("SOFTHSM2_CONF", env.path("softhsm/softhsm2.conf")) };
    let (pkcs11, slot) = open_test_token();
    let session = pkcs11.open_rw_session(slot).unwrap();

    // Without login the private key is not even visible.
    let template = [
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::Label(b"root-ca".to_vec()),
    ];
    assert!(session.find_objects(&template).unwrap().is_empty());

    session
        .login(
            UserType::User,
            Some(&AuthPin::from(env.user_pin().as_str())),
        )
        .unwrap();
    let keys = session.find_objects(&template).unwrap();
    assert_eq!(keys.len(), 1);
    let key = keys[0];

    // Signing only: no decryption, unwrapping, sign-recover or derivation with it (SoftHSM's
    // defaults allow unwrapping and sign-recover: an RSA decryption oracle for the PIN's
    // holder).
    let uses = [
        AttributeType::Decrypt,
        AttributeType::Unwrap,
        AttributeType::SignRecover,
        AttributeType::Derive,
    ];
    let values = session.get_attributes(key, &uses).unwrap();
    assert_eq!(values.len(), uses.len(), "{values:?}");
    for value in &values {
        assert!(
            matches!(
                value,
                Attribute::Decrypt(false)
                    | Attribute::Unwrap(false)
                    | Attribute::SignRecover(false)
                    | Attribute::Derive(false)
            ),
            "the root key allows {value:?}"
        );
    }
    assert!(matches!(
        session.get_attributes(key, &[AttributeType::Sign]).unwrap()[..],
        [Attribute::Sign(true)]
    ));

    // Reading the secret value: the token answers CKR_ATTRIBUTE_SENSITIVE.
    let info = session
        .get_attribute_info(key, &[AttributeType::Value, AttributeType::PrivateExponent])
        .unwrap();
    assert!(
        info.iter()
            .all(|i| matches!(i, AttributeInfo::Sensitive | AttributeInfo::TypeInvalid)),
        "{info:?}"
    );
    assert!(
        info.iter().any(|i| matches!(i, AttributeInfo::Sensitive)),
        "{info:?}"
    );
    assert!(
        session
            .get_attributes(key, &[AttributeType::Value])
            .unwrap()
            .is_empty()
    );

    // Wrapping it out under a key we control: refused (CKA_EXTRACTABLE is false).
    let wrapping = session
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Token(false),
                Attribute::ValueLen(32.into()),
                Attribute::Wrap(true),
                Attribute::Encrypt(true),
            ],
        )
        .unwrap();
    let wrapped = session.wrap_key(&Mechanism::AesKeyWrapPad, wrapping, key);
    assert!(
        wrapped.is_err(),
        "the root key was wrapped out of the token"
    );

    // And the attribute cannot be flipped to extractable.
    assert!(
        session
            .update_attributes(key, &[Attribute::Extractable(true)])
            .is_err()
    );

    // A key allowing unwrapping (as one made elsewhere and adopted may): `root show` names
    // it on stderr, but does not fail, since the key still cannot leave the token.
    session
        .update_attributes(key, &[Attribute::Unwrap(true)])
        .unwrap();
    let out = env.run_with_config_ok(&["root", "show"]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(stdout.contains("CKA_UNWRAP            true"), "{stdout}");
    assert!(stdout.contains("CKA_DECRYPT           false"), "{stdout}");
    assert!(
        stderr.contains("warning: root key") && stderr.contains("(CKA_UNWRAP true)"),
        "{stderr}"
    );

    // `root restrict-key` (for keys made by older builds, or adopted) sets it false again;
    // `root show` then warns of nothing, and a second run has nothing to do.
    let out = env.run_with_config_ok(&["root", "restrict-key"]);
    assert!(
        text(&out.stdout).contains("now allows only signing (CKA_UNWRAP set false)"),
        "{}",
        text(&out.stdout)
    );
    let out = env.run_with_config_ok(&["root", "show"]);
    assert!(
        !text(&out.stderr).contains("warning"),
        "{}",
        text(&out.stderr)
    );
    assert!(text(&out.stdout).contains("CKA_UNWRAP            false"));
    let out = env.run_with_config_ok(&["root", "restrict-key"]);
    assert!(
        text(&out.stdout).contains("allows only signing already"),
        "{}",
        text(&out.stdout)
    );
}
