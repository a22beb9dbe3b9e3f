//! A VM's disk: create it (thin, or cloned from a base image), grow it (live or not), adopt
//! an existing image deliberately, and check that an image is the VM's own before using it.
//!
//! No call that can resize runs without checking first that it grows: QMP `block_resize` to
//! a smaller size silently shrinks an RBD image. No image is attached, grown, trashed or
//! deleted unless its owner metadata names the VM (see `ownership`).

use anyhow::{Context, Result};

use super::{Ctx, LinkRx, Outcome, Reporter, connection};
use crate::exec::qmp::Qmp;
use crate::exec::rbd::{Cluster, IoCtx};
use crate::failpoint;
use crate::model::{BaseImage, GIB};
use crate::ownership::{self, CREATING_SUFFIX, OWNER_KEY, Owner, Ownership};
use crate::render::ROOT_NODE;

/// How long a live grow waits for a QMP connection being re-established.
const LINK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Which image of which VM, and the owner record a new one gets.
#[derive(Debug, Clone)]
pub struct Disk {
    /// Pool.
    pub pool: String,
    /// Image name (the VM's name).
    pub image: String,
    /// The VM.
    pub vm: String,
    /// The owner metadata a created or adopted image gets.
    pub owner: Owner,
}

/// Why an image is not used.
fn foreign(d: &Disk, whose: &Ownership) -> anyhow::Error {
    anyhow::anyhow!(
        "image {}/{} exists but is not this VM's disk ({whose}); vmkeeper never attaches, grows \
         or deletes an image it does not own. If it is this VM's disk, adopt it deliberately: \
         vmkeeper adopt-disk {}",
        d.pool,
        d.image,
        d.vm
    )
}

/// The ownership of `image` in `io`, `None` when it does not exist.
fn whose(io: &IoCtx, image: &str, vm: &str) -> Result<Option<Ownership>> {
    if !io.exists(image)? {
        return Ok(None);
    }
    let meta = io.open_read_only(image)?.metadata(OWNER_KEY)?;
    Ok(Some(ownership::judge(meta.as_deref(), vm)))
}

/// Checks that the VM's image exists and is its own (before QEMU attaches it).
pub async fn check_owned(ctx: &Ctx, d: &Disk) -> Result<()> {
    let cluster = ctx.ceph.get().await?;
    let d2 = d.clone();
    let verdict = cluster
        .run(move |c| Ok(whose(&c.ioctx(&d2.pool)?, &d2.image, &d2.vm)))
        .await??;
    match verdict {
        Some(Ownership::Ours) => Ok(()),
        Some(w) => Err(foreign(d, &w)),
        None => anyhow::bail!("image {}/{} does not exist", d.pool, d.image),
    }
}

/// What `create` found.
enum Found {
    /// The VM's image exists and is its own: its size and id.
    Ours(u64, String),
    /// An unfinished image of ours under the creating name.
    Unfinished,
    /// Nothing: start from scratch.
    Nothing,
}

/// Creates the image under its creating name, marks it, clones and grows as needed, and
/// only then gives it the VM's name; finishes what an interrupted create left. An image of
/// the VM's name that is not its own is refused, never taken.
pub async fn create(
    ctx: &Ctx,
    r: &Reporter,
    d: &Disk,
    bytes: u64,
    clone_from: Option<BaseImage>,
) -> Result<Outcome> {
    let cluster = ctx.ceph.get().await?;
    let temp = format!("{}{CREATING_SUFFIX}", d.image);
    let (d2, t2) = (d.clone(), temp.clone());
    let found = cluster
        .run(move |c| {
            let io = c.ioctx(&d2.pool)?;
            Ok(match whose(&io, &d2.image, &d2.vm) {
                Err(e) => Err(e),
                Ok(Some(Ownership::Ours)) => {
                    let img = io.open_read_only(&d2.image)?;
                    Ok(Found::Ours(img.size()?, img.id()?))
                }
                Ok(Some(w)) => Err(foreign(&d2, &w)),
                Ok(None) if io.exists(&t2)? => Ok(Found::Unfinished),
                Ok(None) => Ok(Found::Nothing),
            })
        })
        .await??;
    match found {
        Found::Ours(size, id) => {
            return Ok(Outcome::Created {
                bytes: size,
                created: false,
                id,
            });
        }
        Found::Unfinished => mark(&cluster, d, &temp, true).await?,
        Found::Nothing => {
            make(&cluster, d, &temp, bytes, clone_from.as_ref()).await?;
            mark(&cluster, d, &temp, false).await?;
            failpoint::hit(
                if clone_from.is_some() {
                    "clone:after-clone"
                } else {
                    "create:after-create"
                },
                r.vm(),
            )
            .await;
        }
    }
    let size = grow_rbd(ctx, &d.pool, &temp, bytes).await?;
    if clone_from.is_some() {
        failpoint::hit("clone:after-grow", r.vm()).await;
    }
    let (d2, t2) = (d.clone(), temp.clone());
    let id = cluster
        .run(move |c| {
            let io = c.ioctx(&d2.pool)?;
            io.rename(&t2, &d2.image)?;
            io.open_read_only(&d2.image)?.id()
        })
        .await
        .with_context(|| format!("cannot name the new image {}/{}", d.pool, d.image))?;
    Ok(Outcome::Created {
        bytes: size,
        created: true,
        id,
    })
}

/// Creates the image (thin, or as a clone) under `temp`.
async fn make(
    cluster: &Cluster,
    d: &Disk,
    temp: &str,
    bytes: u64,
    clone_from: Option<&BaseImage>,
) -> Result<()> {
    let (d2, t2, base) = (d.clone(), temp.to_owned(), clone_from.cloned());
    cluster
        .run(move |c| {
            let io = c.ioctx(&d2.pool)?;
            match &base {
                None => io.create(&t2, bytes),
                Some(b) => {
                    let parent = c.ioctx(b.pool.as_deref().unwrap_or(&d2.pool))?;
                    io.clone_from(&parent, &b.name, &b.snapshot, &t2)
                }
            }
        })
        .await
        .with_context(|| format!("cannot create {}/{temp}", d.pool))
}

/// Writes the owner metadata on the image being created. An unfinished image is taken only
/// when unmarked or marked for this VM (its name is vmkeeper's, but its mark must agree).
async fn mark(cluster: &Cluster, d: &Disk, temp: &str, resuming: bool) -> Result<()> {
    let (d2, t2) = (d.clone(), temp.to_owned());
    cluster
        .run(move |c| {
            let io = c.ioctx(&d2.pool)?;
            let img = io.open(&t2)?;
            if resuming {
                let meta = img.metadata(OWNER_KEY)?;
                match ownership::judge(meta.as_deref(), &d2.vm) {
                    Ownership::Ours => return Ok(Ok(())),
                    Ownership::Unowned => {}
                    w @ Ownership::Other(_) => return Ok(Err(foreign(&d2, &w))),
                }
            }
            img.set_metadata(OWNER_KEY, &d2.owner.to_json())?;
            Ok(Ok(()))
        })
        .await
        .with_context(|| format!("cannot mark {}/{temp} as {}'s", d.pool, d.vm))?
}

/// Marks an existing image as the VM's, deliberately (`vmkeeper adopt-disk`): allowed for
/// an unmarked image, refused for one marked as another VM's. Returns what was done.
pub async fn adopt(ctx: &Ctx, d: &Disk) -> Result<Outcome> {
    let cluster = ctx.ceph.get().await?;
    let d2 = d.clone();
    cluster
        .run(move |c| {
            let io = c.ioctx(&d2.pool)?;
            let spec = format!("{}/{}", d2.pool, d2.image);
            Ok(match whose(&io, &d2.image, &d2.vm) {
                Err(e) => Err(e),
                Ok(None) => Err(anyhow::anyhow!("there is no image {spec} to adopt")),
                Ok(Some(Ownership::Ours)) => Ok(format!("image {spec} is already this VM's")),
                Ok(Some(Ownership::Other(who))) => Err(anyhow::anyhow!(
                    "image {spec} is owned by {who}: not adopted"
                )),
                Ok(Some(Ownership::Unowned)) => {
                    io.open(&d2.image)?
                        .set_metadata(OWNER_KEY, &d2.owner.to_json())?;
                    Ok(format!("image {spec} adopted as this VM's disk"))
                }
            })
        })
        .await?
        .map(|what| Outcome::Staged {
            what,
            trashed: None,
        })
}

/// Grows the image to `bytes`: through the running QEMU when `link` is given (QEMU's
/// `query-block` gives the size to check against, without opening the image; QEMU attached
/// it only after its ownership was checked), else with librbd after checking ownership.
pub async fn grow(
    ctx: &Ctx,
    r: &Reporter,
    d: &Disk,
    bytes: u64,
    link: Option<LinkRx>,
) -> Result<Outcome> {
    let Some(mut link) = link else {
        check_owned(ctx, d).await?;
        let before = current_rbd(ctx, &d.pool, &d.image).await?;
        refuse_shrink(before, bytes)?;
        let after = grow_rbd(ctx, &d.pool, &d.image, bytes).await?;
        return Ok(Outcome::Grown {
            bytes: after,
            how: if after > before {
                "RBD resize"
            } else {
                "already at that size"
            },
        });
    };
    let q = connection(&mut link, None, LINK_WAIT)
        .await
        .context("no QMP connection to grow the disk live")?;
    let current = qemu_size(&q).await?;
    refuse_shrink(current, bytes)?;
    if current == bytes {
        return Ok(Outcome::Grown {
            bytes,
            how: "already at that size",
        });
    }
    failpoint::hit("grow:before-resize", r.vm()).await;
    q.block_resize(ROOT_NODE, bytes).await?;
    failpoint::hit("grow:after-resize", r.vm()).await;
    let seen = qemu_size(&q).await?;
    anyhow::ensure!(
        seen == bytes,
        "QEMU reports {seen} bytes after block_resize to {bytes}"
    );
    Ok(Outcome::Grown {
        bytes,
        how: "live, QMP block_resize",
    })
}

async fn qemu_size(q: &Qmp) -> Result<u64> {
    q.query_block()
        .await?
        .iter()
        .find(|b| b.node_name.as_deref() == Some(ROOT_NODE))
        .and_then(|b| b.size_bytes)
        .with_context(|| format!("QEMU has no block node {ROOT_NODE}"))
}

fn refuse_shrink(current: u64, bytes: u64) -> Result<()> {
    anyhow::ensure!(
        bytes >= current,
        "cannot shrink from {} to {} GiB; disks only grow — provision a new VM instead",
        current / GIB,
        bytes / GIB
    );
    Ok(())
}

async fn current_rbd(ctx: &Ctx, pool: &str, image: &str) -> Result<u64> {
    let cluster = ctx.ceph.get().await?;
    let (p, i) = (pool.to_owned(), image.to_owned());
    Ok(cluster.run(move |c| c.ioctx(&p)?.stat(&i)).await?.size)
}

/// Grows with librbd to at least `bytes` (never shrinks); returns the size afterwards.
async fn grow_rbd(ctx: &Ctx, pool: &str, image: &str, bytes: u64) -> Result<u64> {
    let cluster = ctx.ceph.get().await?;
    let (p, i) = (pool.to_owned(), image.to_owned());
    let size = cluster
        .run(move |c| {
            let io = c.ioctx(&p)?;
            let size = io.stat(&i)?.size;
            if size < bytes {
                io.grow(&i, bytes)?;
                return Ok(bytes);
            }
            Ok(size)
        })
        .await
        .with_context(|| format!("cannot grow {pool}/{image}"))?;
    Ok(size)
}
