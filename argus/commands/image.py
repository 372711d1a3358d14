"""``/image <prompt>`` — draw an image with the catalogue's image model (Gemini 2.5 Flash Image).

The request goes through the API-key pool (rotation, failover). The image is
checked by decoding it (as uploads are), shown in the chat, and kept in the
conversation: the request and an answer carrying the image as its attachment,
so it shows again when the conversation is resumed.
"""
from __future__ import annotations

from argus.commands.base import Command, CommandContext, CommandUsageError, OutFile, escape_md, one_line
from argus.remote import MediaError, Remote
from argus.uploads import UploadRejected, check_image_bytes

#: Longest prompt, in characters.
MAX_PROMPT = 2000
#: Largest image kept, in bytes.
MAX_IMAGE_BYTES = 20 * 1024 * 1024
NOT_CONFIGURED = "Image generation is not available on this server."


async def run(ctx: CommandContext, args: str) -> str:
    """Generate an image for ``args`` and reply with it (``ctx.files``), kept in the conversation.

    Raises:
        CommandUsageError: no prompt, or a prompt longer than :data:`MAX_PROMPT`.
    """
    prompt = args.strip()
    if not prompt:
        raise CommandUsageError("Usage: /image <what to draw>.")
    if len(prompt) > MAX_PROMPT:
        raise CommandUsageError(f"Describe the image in at most {MAX_PROMPT:,} characters.")
    remote = ctx.services.get("remote")
    if not isinstance(remote, Remote):
        return NOT_CONFIGURED
    try:
        images, spec = await remote.generate_image(prompt, ctx.user_id)
    except MediaError as exc:
        return f"No image this time: {exc}"
    files = []
    for i, img in enumerate(images, 1):
        try:
            checked = await ctx.call(check_image_bytes, img.data, f"image-{i}", MAX_IMAGE_BYTES)
        except UploadRejected:
            continue
        ext = checked.mime.split("/")[-1].replace("jpeg", "jpg")
        files.append(OutFile(name=f"image-{i}.{ext}", mime=checked.mime, data=checked.data))
    if not files:
        return f"{spec.label} answered with an image I could not read; please try again."
    shown = escape_md(one_line(prompt, 80))
    reply = f"{'Here is' if len(files) == 1 else 'Here are'} {spec.label}'s {'image' if len(files) == 1 else 'images'} of “{shown}”."
    if ctx.keep is not None:
        await ctx.keep(f"/image {prompt}", reply, files)
    ctx.files.extend(files)
    return reply


COMMAND = Command(
    name="image",
    usage="/image <prompt>",
    description="Draw an image (Gemini 2.5 Flash Image); it is kept in the conversation.",
    icon="image",
    run=run,
)
