//! The world-touching part of each deletion stage. Each act is idempotent: run again after a
//! crash, it finds its work done and says so, and never destroys more.

use anyhow::{Context, Result};

use super::qemu::{self, QemuStop};
use super::{Ctx, Outcome, Reporter};
use crate::deletion::Stage;
use crate::exec::rbd::TrashEntry;
use crate::failpoint;

/// Runs `stage`'s act between its two failpoints.
pub async fn act(
    ctx: &Ctx,
    r: &Reporter,
    stage: Stage,
    stop: Option<&QemuStop>,
    pool: &str,
    image: &str,
) -> Result<Outcome> {
    failpoint::hit(&format!("deletion:{stage}:after-started"), r.vm()).await;
    let mut done = vec![];
    if let Some(s) = stop {
        qemu::stop(ctx, r, s, None).await?;
        done.push("VM off".to_owned());
    }
    match stage {
        Stage::Purge => done.push(trash(ctx, pool, image).await?),
        Stage::DeleteBackups => done.push(delete_backups(ctx, pool, image).await?),
        Stage::Announce | Stage::Shutdown | Stage::ReleaseName => {}
    }
    failpoint::hit(&format!("deletion:{stage}:after-acted"), r.vm()).await;
    Ok(Outcome::Staged(done.join("; ")))
}

/// Moves the image to the RBD trash; an image already there is done.
async fn trash(ctx: &Ctx, pool: &str, image: &str) -> Result<String> {
    let cluster = ctx.ceph.get().await?;
    let (p, i) = (pool.to_owned(), image.to_owned());
    cluster
        .run(move |c| {
            let io = c.ioctx(&p)?;
            if io.exists(&i)? {
                let id = io.trash_move(&i)?;
                return Ok(format!("image {p}/{i} moved to the trash (id {id})"));
            }
            let ids = trashed(&io.trash_list()?, &i);
            Ok(if ids.is_empty() {
                format!("image {p}/{i} was neither in the pool nor in the trash")
            } else {
                format!("image {p}/{i} already in the trash (id {})", ids.join(", "))
            })
        })
        .await
        .with_context(|| format!("cannot move {pool}/{image} to the trash"))
}

/// Deletes the backups: every snapshot of the trashed image, then the image itself.
async fn delete_backups(ctx: &Ctx, pool: &str, image: &str) -> Result<String> {
    let cluster = ctx.ceph.get().await?;
    let (p, i) = (pool.to_owned(), image.to_owned());
    cluster
        .run(move |c| {
            let io = c.ioctx(&p)?;
            let ids = trashed(&io.trash_list()?, &i);
            let mut snaps = 0;
            for id in &ids {
                let img = io.open_by_id(id)?;
                for s in img.snapshots()? {
                    if img.snapshot_is_protected(&s.name)? {
                        img.unprotect_snapshot(&s.name)?;
                    }
                    img.remove_snapshot(&s.name)?;
                    snaps += 1;
                }
                drop(img);
                io.trash_remove(id, true)?;
            }
            let mut msg = format!(
                "{snaps} snapshot(s) and {} trashed image(s) of {p}/{i} deleted",
                ids.len()
            );
            if io.exists(&i)? {
                // Restored from the trash by an operator: theirs now, left alone.
                msg.push_str("; an image of that name is back in the pool and is left alone");
            }
            Ok(msg)
        })
        .await
        .with_context(|| format!("cannot delete the backups of {pool}/{image}"))
}

/// Ids of the trashed images that had `image`'s name.
fn trashed(entries: &[TrashEntry], image: &str) -> Vec<String> {
    entries
        .iter()
        .filter(|e| e.name == image)
        .map(|e| e.id.clone())
        .collect()
}
