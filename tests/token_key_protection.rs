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
}
