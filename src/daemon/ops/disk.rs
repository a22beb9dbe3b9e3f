//! A VM's disk: create it (thin, or cloned from a base image) and grow it, live or not. No
//! call that can resize runs without checking first that it grows: QMP `block_resize` to a
//! smaller size silently shrinks an RBD image.

use anyhow::{Context, Result};

use super::{Ctx, LinkRx, Outcome, Reporter, connection};
use crate::exec::qmp::Qmp;
use crate::failpoint;
use crate::model::{BaseImage, GIB};
use crate::render::ROOT_NODE;

/// How long a live grow waits for a QMP connection being re-established.
const LINK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Creates the image, or finishes one an interrupted create or clone left (grows a clone
/// that did not reach its size yet). Returns the image's size.
pub async fn create(
    ctx: &Ctx,
    r: &Reporter,
    pool: &str,
    image: &str,
    bytes: u64,
    clone_from: Option<BaseImage>,
) -> Result<Outcome> {
    let cluster = ctx.ceph.get().await?;
    let (p, i) = (pool.to_owned(), image.to_owned());
    let existing = cluster
        .run(move |c| {
            let io = c.ioctx(&p)?;
            if io.exists(&i)? {
                Ok(Some(io.stat(&i)?.size))
            } else {
                Ok(None)
            }
        })
        .await?;
    if let Some(size) = existing {
        return Ok(Outcome::Created {
            bytes: grow_rbd(ctx, pool, image, size.max(bytes)).await?,
            created: false,
        });
    }
    let (p, i) = (pool.to_owned(), image.to_owned());
    match clone_from {
        None => {
            cluster
                .run(move |c| c.ioctx(&p)?.create(&i, bytes))
                .await
                .with_context(|| format!("cannot create {pool}/{image}"))?;
            failpoint::hit("create:after-create", r.vm()).await;
        }
        Some(base) => {
            cluster
                .run(move |c| {
                    let io = c.ioctx(&p)?;
                    let parent = c.ioctx(base.pool.as_deref().unwrap_or(&p))?;
                    io.clone_from(&parent, &base.name, &base.snapshot, &i)
                })
                .await
                .with_context(|| format!("cannot clone {pool}/{image}"))?;
            failpoint::hit("clone:after-clone", r.vm()).await;
            grow_rbd(ctx, pool, image, bytes).await?;
            failpoint::hit("clone:after-grow", r.vm()).await;
        }
    }
    Ok(Outcome::Created {
        bytes,
        created: true,
    })
}

/// Grows the image to `bytes`: through the running QEMU when `link` is given (QEMU's
/// `query-block` gives the size to check against, without opening the image), else with
/// librbd.
pub async fn grow(
    ctx: &Ctx,
    r: &Reporter,
    pool: &str,
    image: &str,
    bytes: u64,
    link: Option<LinkRx>,
) -> Result<Outcome> {
    let Some(mut link) = link else {
        let before = current_rbd(ctx, pool, image).await?;
        let after = grow_rbd(ctx, pool, image, bytes).await?;
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

/// Grows with librbd, which refuses a shrink itself; returns the size afterwards.
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
    refuse_shrink(size, bytes)?;
    Ok(size)
}
