//! Reading an HTTP answer's body within a bound, for meshca's reqwest clients (Vault, the
//! signer): a broken or hostile peer must not make a client hold an answer of any size
//! (a timeout bounds only its duration).

/// Why an answer's body was not read whole.
#[derive(Debug)]
pub enum BodyError {
    /// The connection failed while the body came.
    Transport(reqwest::Error),
    /// More than the bound came.
    TooLarge,
}

/// The answer's body, up to `limit` bytes.
pub async fn body_up_to(
    response: &mut reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, BodyError> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(BodyError::Transport)? {
        if body.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}
