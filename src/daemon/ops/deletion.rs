//! The world-touching part of each deletion stage. Each act is idempotent: run again after a
//! crash, it finds its work done and says so, and never destroys more. Only the VM's own
//! image (its owner metadata and its recorded id) is trashed, and only the image the purge
//! trashed is deleted with its backups.

use std::time::Duration;

use anyhow::{Context, Result};

use super::disk::Disk;
use super::qemu::{self, QemuStop};
use super::{Ctx, Outcome, Reporter};
use crate::deletion::Stage;
use crate::exec::rbd::IoCtx;
use crate::failpoint;
use crate::ownership::{self, OWNER_KEY, Ownership};

/// The image ids a stage acts on.
#[derive(Debug, Clone, Default)]
pub struct Ids {
    /// The VM's image as recorded at its creation.
    pub image: Option<String>,
    /// The image the purge moved to the trash.
    pub trashed: Option<String>,
}

/// Runs `stage`'s act between its two failpoints.
pub async fn act(
    ctx: &Ctx,
    r: &Reporter,
    stage: Stage,
    stop: Option<&QemuStop>,
    disk: &Disk,
    defer: Duration,
    ids: &Ids,
) -> Result<Outcome> {
    failpoint::hit(&format!("deletion:{stage}:after-started"), r.vm()).await;
    let mut done = vec![];
    if let Some(s) = stop {
        qemu::stop(ctx, r, s, None).await?;
        done.push("VM off".to_owned());
    }
    let mut trashed = None;
    match stage {
        Stage::Purge => {
            let (what, id) = trash(ctx, disk, defer, ids.image.clone()).await?;
            done.push(what);
            trashed = id;
        }
        Stage::DeleteBackups => done.push(delete_backups(ctx, disk, ids.trashed.clone()).await?),
        Stage::Announce | Stage::Shutdown | Stage::ReleaseName => {}
    }
    failpoint::hit(&format!("deletion:{stage}:after-acted"), r.vm()).await;
    Ok(Outcome::Staged {
        what: done.join("; "),
        trashed,
    })
}

/// Moves the VM's own image to the trash, deferred for `defer`; an image already there (a
/// crash after the move) is done. Returns what was done and the trashed image's id.
async fn trash(
    ctx: &Ctx,
    d: &Disk,
    defer: Duration,
    expected: Option<String>,
) -> Result<(String, Option<String>)> {
    let cluster = ctx.ceph.get().await?;
    let d2 = d.clone();
    cluster
        .run(move |c| {
            let io = c.ioctx(&d2.pool)?;
            Ok(move_to_trash(&io, &d2, defer, expected.as_deref()))
        })
        .await
        .with_context(|| format!("cannot move {}/{} to the trash", d.pool, d.image))?
}

fn move_to_trash(
    io: &IoCtx,
    d: &Disk,
    defer: Duration,
    expected: Option<&str>,
) -> Result<(String, Option<String>)> {
    let spec = format!("{}/{}", d.pool, d.image);
    if io.exists(&d.image)? {
        let img = io.open_read_only(&d.image)?;
        let id = img.id()?;
        let whose = ownership::judge(img.metadata(OWNER_KEY)?.as_deref(), &d.vm);
        anyhow::ensure!(
            whose == Ownership::Ours && expected.is_none_or(|e| e == id),
            "image {spec} (id {id}) is not this VM's disk ({whose}{}): not trashed",
            expected.map_or(String::new(), |e| format!(", the VM's image has id {e}"))
        );
        drop(img);
        let id = io.trash_move_deferred(&d.image, defer)?;
        return Ok((
            format!(
                "image {spec} moved to the trash (id {id}), deferred for {} days",
                defer.as_secs() / 86_400
            ),
            Some(id),
        ));
    }
    let entries = io.trash_list()?;
    let found = entries
        .iter()
        .find(|e| expected.map_or(e.name == d.image, |x| e.id == x));
    Ok(match found {
        Some(e) => (
            format!("image {spec} already in the trash (id {})", e.id),
            Some(e.id.clone()),
        ),
        None => (
            format!("image {spec} was neither in the pool nor in the trash"),
            None,
        ),
    })
}

/// Deletes the backups: every snapshot of the image the purge trashed, then that image; no
/// other image of the name is touched.
async fn delete_backups(ctx: &Ctx, d: &Disk, trashed: Option<String>) -> Result<String> {
    let spec = format!("{}/{}", d.pool, d.image);
    let Some(id) = trashed else {
        return Ok(format!(
            "no trashed image of {spec} is on record (purged by an older vmkeeper): nothing \
             deleted; see `rbd trash ls --long {}`",
            d.pool
        ));
    };
    let cluster = ctx.ceph.get().await?;
    let pool = d.pool.clone();
    cluster
        .run(move |c| {
            let io = c.ioctx(&pool)?;
            if !io.trash_list()?.iter().any(|e| e.id == id) {
                return Ok(format!("the trashed image {id} of {spec} is gone already"));
            }
            let img = io.open_by_id(&id)?;
            let mut snaps = 0;
            for s in img.snapshots()? {
                if img.snapshot_is_protected(&s.name)? {
                    img.unprotect_snapshot(&s.name)?;
                }
                img.remove_snapshot(&s.name)?;
                snaps += 1;
            }
            drop(img);
            // Forced: its deferment lasts until this very date.
            io.trash_remove(&id, true)?;
            Ok(format!(
                "{snaps} snapshot(s) and the trashed image {id} of {spec} deleted"
            ))
        })
        .await
        .with_context(|| format!("cannot delete the backups of {}/{}", d.pool, d.image))
}
