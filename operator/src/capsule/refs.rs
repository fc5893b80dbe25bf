//! The Capsules an Agent or a Job names, looked up: each must exist and be Ready (verified,
//! not revoked, allowed) before anything that uses it starts.

/// What became of one Capsule an Agent or a Job names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CapsuleRef {
    /// It exists and is Ready: what to deliver into the pod (`None` for content no pod can
    /// receive, which a verified Capsule never has).
    Ready(Option<super::delivery::Delivery>),
    /// It does not exist.
    Missing,
    /// It exists and is not Ready (not verified, revoked, denied): reason, message, and what
    /// running pods holding it must be told.
    NotReady(String, String, super::revocation::Standing),
}

impl CapsuleRef {
    /// What running pods holding it must be told: usable when Ready; revoked, or not known
    /// now, when not; not known when it does not exist (the pods keep what they were told).
    pub fn standing(&self) -> super::revocation::Standing {
        match self {
            CapsuleRef::Ready(_) => super::revocation::Standing::Usable,
            CapsuleRef::Missing => super::revocation::Standing::Unknown,
            CapsuleRef::NotReady(_, _, s) => s.clone(),
        }
    }
}

/// Looks up each of `capsules` in `namespace`: one read each, in order.
pub async fn capsule_refs(
    client: &kube::Client,
    namespace: &str,
    capsules: &[soma_crds::LocalRef],
) -> crate::error::Result<Vec<(String, CapsuleRef)>> {
    let api: kube::Api<soma_crds::Capsule> = kube::Api::namespaced(client.clone(), namespace);
    let mut out = Vec::with_capacity(capsules.len());
    for capsule in capsules {
        let found =
            api.get_opt(&capsule.name)
                .await
                .map_err(|source| crate::error::Error::Read {
                    what: format!("Capsule {namespace}/{}", capsule.name),
                    source,
                })?;
        let state = match found {
            None => CapsuleRef::Missing,
            Some(c) => match super::status::readiness(c.status.as_ref()) {
                Ok(()) => CapsuleRef::Ready(super::delivery::delivery(&c)),
                Err((reason, message)) => {
                    CapsuleRef::NotReady(reason, message, super::revocation::standing(&c))
                }
            },
        };
        out.push((capsule.name.clone(), state));
    }
    Ok(out)
}
