#!/bin/sh
# vmkeeper notifyCommand: mail every event to the technical contacts of its VM's project
# through sendmail (the event names the project and carries its contacts, so one hook serves
# every project).
# vmkeeper runs it with one JSON event on stdin (see docs/usage/maintenance.md) and kills it
# after 30 s; a non-zero exit is logged, never retried. Needs jq and a sendmail binary.
set -eu
event=$(cat)
field() { printf '%s' "$event" | jq -r "$1"; }
kind=$(field .event)
vm=$(field .vm)
project=$(field '.project // "default"')
contacts=$(field '.contacts | join(", ")')
[ -n "$contacts" ] || exit 0
case "$kind" in
  unplanned) subject="ALARM: unplanned $(field .action) of VM $vm" ;;
  maintenance-scheduled) subject="Maintenance of VM $vm: $(field .slot.start) – $(field .slot.end)" ;;
  maintenance-cancelled) subject="Maintenance of VM $vm cancelled" ;;
  *) subject="vmkeeper: $kind $vm" ;;
esac
subject="[$project] $subject"
{
  printf 'To: %s\nSubject: %s\nContent-Type: text/plain; charset=utf-8\n\n' "$contacts" "$subject"
  printf 'Project: %s\nVM:     %s\nWhat:   %s\nWhy:    %s\nWhen:   %s\n' "$project" "$vm" "$kind" "$(field .reason)" "$(field .at)"
  if [ "$(field '.slot // empty')" != "" ]; then
    printf 'Slot:   %s – %s\n' "$(field .slot.start)" "$(field .slot.end)"
  fi
  printf '\nThe VM is rebooted in the slot; changes apply then. Questions: reply to this mail.\n'
} | /usr/sbin/sendmail -t
