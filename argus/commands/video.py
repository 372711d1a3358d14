"""``/video <prompt>`` — make a short video with the catalogue's video model (Veo 3).

Veo works for minutes: the request is started through the API-key pool, its
operation polled (progress shown in the chat on one line that is updated), the
file downloaded, shown in the chat and kept in the conversation like an upload.
Timeouts and failures are reported in one sentence.
"""
from __future__ import annotations

from argus.commands.base import Command, CommandContext, CommandUsageError, OutFile, escape_md, one_line
from argus.providers import VideoProgress
from argus.remote import MediaError, Remote

#: Longest prompt, in characters.
MAX_PROMPT = 2000
NOT_CONFIGURED = "Video generation is not available on this server."


def progress_line(p: VideoProgress) -> str:
    """The progress line shown while a video is made."""
    minutes, seconds = divmod(int(p.elapsed_s), 60)
    done = f"{p.percent:.0f} % done, " if p.percent is not None else ""
    return f"_Making your video… {done}{minutes} min {seconds:02d} s so far._"


async def run(ctx: CommandContext, args: str) -> str:
    """Generate a video for ``args`` and reply with it (``ctx.files``), kept in the conversation.

    Raises:
        CommandUsageError: no prompt, or a prompt longer than :data:`MAX_PROMPT`.
    """
    prompt = args.strip()
    if not prompt:
        raise CommandUsageError("Usage: /video <what to film>.")
    if len(prompt) > MAX_PROMPT:
        raise CommandUsageError(f"Describe the video in at most {MAX_PROMPT:,} characters.")
    remote = ctx.services.get("remote")
    if not isinstance(remote, Remote):
        return NOT_CONFIGURED

    async def report(p: VideoProgress) -> None:
        if ctx.progress is not None:
            await ctx.progress(progress_line(p))

    if ctx.progress is not None:
        await ctx.progress("_Making your video… this usually takes one to a few minutes._")
    try:
        video, spec = await remote.generate_video(prompt, ctx.user_id, progress=report)
    except MediaError as exc:
        return f"No video this time: {exc}"
    mime = video.mime if video.mime.startswith("video/") else "video/mp4"
    ext = mime.split("/")[-1].split(";")[0] or "mp4"
    files = [OutFile(name=f"video.{ext}", mime=mime, data=video.data)]
    reply = f"Here is {spec.label}'s video of “{escape_md(one_line(prompt, 80))}”."
    if ctx.keep is not None:
        await ctx.keep(f"/video {prompt}", reply, files)
    ctx.files.extend(files)
    return reply


COMMAND = Command(
    name="video",
    usage="/video <prompt>",
    description="Make a short video (Veo 3); progress shows while it is made; it is kept in the conversation.",
    icon="clapperboard",
    run=run,
)
